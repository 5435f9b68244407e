"""`slidechat <command> ...`: the package's command-line entry, one sub-command per task."""

from __future__ import annotations

import sys

from wsicore.cli import Command, dispatch

COMMANDS = {
    "build-instructions": Command("slidechat.instructions:main", "SlideInstruction JSON -> training JSON tied to feature stores"),
    "train": Command("slidechat.train:main", "train stage 1 (captions) or stage 2 (instructions)"),
    "evaluate": Command("slidechat.evaluate:main", "answer a benchmark (SlideBench, WSI-Bench) and score it"),
    "score": Command("slidechat.scoring:main", "score an outputs CSV against its benchmark"),
    "ask": Command("slidechat.inference:ask_main", "ask a trained model about one slide file"),
    "chat": Command("slidechat.inference:chat_main", "multi-turn chat about one slide file"),
    "serve": Command("slidechat.serve.app:main", "local web page: slide viewer, chat, where the answer came from"),
    "report": Command("slidechat.report:main", "HTML/Markdown report of an evaluation"),
    "convert-checkpoint": Command("slidechat.checkpoint:convert_main", "released SlideChat weights -> our model directory"),
    "make-tiny-llm": Command("slidechat.tiny:main", "a tiny randomly initialised Qwen2-shaped LLM (demo, tests)"),
    "demo-instructions": Command("slidechat.demo_data:main", "the demo's instructions and held-out benchmark"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("slidechat", COMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
