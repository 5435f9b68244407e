"""The error convention of every command.

A mistake the user can fix (a bad file, slide, flag or config key) raises a `UserError` whose message
names the file, slide or flag and says what to do. The command dispatcher (`wsicore.cli`) prints it as
one line on stderr and exits with the error's code; anything else is a bug and keeps its traceback.

A message speaks of flags: the same commands serve people at a terminal, who have no config file. Where
a flag comes from a config key when the workflow runs the command, the error carries `config_hint` (the
key and what to set), which the dispatcher adds only under the workflow (the Snakefile sets WORKFLOW_ENV).

Exit codes (documented in the README):
    0  success
    1  unexpected error (a bug: traceback printed)
    2  usage error or bad input: a flag, file, slide, store, checkpoint or config key (UserError)
    3  training stopped because the loss or gradient became NaN/inf (TrainingDiverged)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

WORKFLOW_ENV = "WSI_SLIDECHAT_WORKFLOW"  # set by the Snakefile: commands run as workflow jobs


class UserError(Exception):
    """Base class of every error a user can fix; the message is the one line they see."""

    exit_code = EXIT_USER

    def __init__(self, message: str = "", *, config_hint: str | None = None) -> None:
        super().__init__(message)
        self.config_hint = config_hint  # e.g. "set `llm.path` to a local LLM directory" (workflow runs only)


class UsageError(UserError):
    """A command-line flag or argument is wrong."""


class ConfigError(UserError, ValueError):
    """A config key (or the flag that sets it) has a value that cannot be honoured; the message names it."""


class InputError(UserError):
    """An input file (slide, store, checkpoint, JSON, CSV) is missing, damaged or of the wrong kind."""


class UnsafeFileError(InputError):
    """A file would make us run code or read something other than plain data; it is refused."""
