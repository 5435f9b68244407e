"""One command dispatcher for `python -m preprocessing` and `slidechat`, and the parser every command uses.

The dispatcher turns a `UserError` into one line on stderr and its exit code (see `wsicore.errors`);
tracebacks are for bugs, or for anyone who passes `--debug` (or sets WSI_DEBUG=1).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from wsicore import __version__
from wsicore.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER, WORKFLOW_ENV, UserError


@dataclass(frozen=True)
class Command:
    """A sub-command: where its `main(argv) -> int` lives ("module:function") and one line saying what it does."""

    target: str
    summary: str


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every flag's default (none for flags without one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse with the error convention: a bad flag is one line on stderr (not the whole usage), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def command_parser(prog: str, description: str | None, example: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose help shows defaults and ends with an example invocation."""
    epilog = f"example:\n  {example}" if example else None
    return CommandParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


def log_to_stderr() -> None:
    """Log lines (INFO and up) of a command on stderr: what long work is doing, in the terminal or the job log."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def _usage(prog: str, commands: dict[str, Command]) -> str:
    width = max(len(n) for n in commands)
    lines = [f"usage: {prog} [--debug] [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in commands.items()]
    lines += ["", f"`{prog} <command> --help` shows a command's options and an example."]
    return "\n".join(lines)


def report_error(prog: str, exc: BaseException, debug: bool = False) -> None:
    """One line on stderr (`prog: error: ...`), the traceback first when debugging; under the workflow a
    UserError's config hint is added (the config key behind the flag the message names)."""
    if debug:
        traceback.print_exception(exc)
    message = " ".join(str(exc).split()) or type(exc).__name__
    hint = getattr(exc, "config_hint", None)
    if hint and os.environ.get(WORKFLOW_ENV):
        message += f" (workflow config: {hint})"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def run_command(prog: str, func: Callable[[list[str]], int | None], argv: Sequence[str], debug: bool = False) -> int:
    """Call a command's main with the error convention applied."""
    try:
        return int(func(list(argv)) or EXIT_OK)
    except UserError as exc:
        report_error(prog, exc, debug)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def dispatch(prog: str, commands: dict[str, Command], argv: Sequence[str]) -> int:
    """Run the sub-command named by argv[0]; modules are imported only when their command runs."""
    argv = list(argv)
    debug = os.environ.get("WSI_DEBUG", "") not in ("", "0")
    while argv and argv[0] in ("--debug", "--version"):
        if argv.pop(0) == "--version":
            print(f"{prog} {__version__}")
            return EXIT_OK
        debug = True
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(prog, commands), file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USER
    name, rest = argv[0], argv[1:]
    if name not in commands:
        near = [c for c in commands if c.startswith(name[:3])] if len(name) >= 3 else []
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        print(f"{prog}: error: unknown command {name!r}{hint}; commands: {', '.join(commands)} "
              f"(`{prog} --help` describes them)", file=sys.stderr)
        return EXIT_USER
    if "--debug" in rest:
        rest.remove("--debug")
        debug = True
    module, func = commands[name].target.split(":")
    # Anything that is not a UserError propagates: a bug keeps its traceback (and exit status 1).
    return run_command(f"{prog} {name}", getattr(importlib.import_module(module), func), rest, debug)
