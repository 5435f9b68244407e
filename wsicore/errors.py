"""The error convention of every command.

A mistake the user can fix (a bad file, slide, flag or config key) raises a `UserError` whose message
names the file, slide or key and says what to do. The command dispatcher (`wsicore.cli`) prints it as
one line on stderr and exits with the error's code; anything else is a bug and keeps its traceback.

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


class UserError(Exception):
    """Base class of every error a user can fix; the message is the one line they see."""

    exit_code = EXIT_USER


class UsageError(UserError):
    """A command-line flag or argument is wrong."""


class ConfigError(UserError):
    """A config key has a value that cannot be honoured; the message names the key."""


class InputError(UserError):
    """An input file (slide, store, checkpoint, JSON, CSV) is missing, damaged or of the wrong kind."""


class UnsafeFileError(InputError):
    """A file would make us run code or read something other than plain data; it is refused."""
