"""`slidechat <command> ...`: the package's command-line entry, one sub-command per task."""

from __future__ import annotations

import importlib
import sys

# command -> "module:function"; each function takes argv (list[str]) and returns an exit code.
COMMANDS = {
    "make-tiny-llm": "slidechat.tiny:main",
    "convert-checkpoint": "slidechat.checkpoint:convert_main",
    "build-instructions": "slidechat.instructions:main",
    "demo-instructions": "slidechat.demo_data:main",
    "train": "slidechat.train:main",
    "evaluate": "slidechat.evaluate:main",
    "score": "slidechat.scoring:main",
    "ask": "slidechat.inference:ask_main",
    "chat": "slidechat.inference:chat_main",
    "report": "slidechat.report:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: slidechat {" + ",".join(COMMANDS) + "} [options]")
        print("  each command has its own --help")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module, func = COMMANDS[argv[0]].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
