"""`slidechat <command> ...`: the package's command-line entry, one sub-command per task."""

from __future__ import annotations

import sys

from preprocessing.__main__ import dispatch

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
    return dispatch("slidechat", COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
