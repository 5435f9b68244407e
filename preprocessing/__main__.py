"""`python -m preprocessing <command> ...`: one entry per stage, called by the Snakemake rules."""

from __future__ import annotations

import importlib
import sys

# command -> "module:function"; each function takes argv (list[str]) and returns an exit code.
COMMANDS = {
    "segment": "preprocessing.tissue:main",
    "tile": "preprocessing.tiling:main",
    "extract": "preprocessing.extract:main",
    "synth": "preprocessing.synthetic:main",
    "summary": "preprocessing.summary:main",
    "export-csv": "preprocessing.stores:export_csv_main",
    "import-csv": "preprocessing.stores:import_csv_main",
}


def dispatch(prog: str, commands: dict[str, str], argv: list[str]) -> int:
    """Run the sub-command named by argv[0]; modules are imported only when their command runs."""
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in commands:
        print(f"usage: {prog} {{" + ",".join(commands) + "} [options]")
        print("  each command has its own --help")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module, func = commands[argv[0]].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m preprocessing", COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
