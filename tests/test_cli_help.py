"""Every command's --help: each option says what it is for (and its default), and the help ends with an example."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from preprocessing.__main__ import COMMANDS as PREPROCESSING
from slidechat.cli import COMMANDS as SLIDECHAT
from wsicore.cli import HelpFormatter

ALL = [("python -m preprocessing", name, cmd) for name, cmd in PREPROCESSING.items()] + \
      [("slidechat", name, cmd) for name, cmd in SLIDECHAT.items()]


def _parser_of(target: str, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.ArgumentParser, str]:
    """The parser a command's main builds, and its --help text (main is stopped when it parses)."""
    seen: list[argparse.ArgumentParser] = []
    parse = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.append(self)
        return parse(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module, func = target.split(":")
    with pytest.raises(SystemExit) as stop:
        getattr(importlib.import_module(module), func)(["--help"])
    assert stop.value.code == 0
    return seen[0], seen[0].format_help()


@pytest.mark.parametrize("prog,name,cmd", ALL, ids=[f"{p.split()[-1]}-{n}" for p, n, _ in ALL])
def test_every_option_has_help_and_the_help_ends_with_an_example(prog, name, cmd, monkeypatch):
    parser, text = _parser_of(cmd.target, monkeypatch)
    assert parser.prog == f"{prog} {name}"
    assert issubclass(parser.formatter_class, HelpFormatter), "build the parser with wsicore.cli.command_parser"
    undocumented = [a.option_strings or [a.dest] for a in parser._actions
                    if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not undocumented, f"{prog} {name}: options without help text: {undocumented}"
    last = text.rstrip().splitlines()
    assert last[-2] == "example:" and last[-1].strip().startswith(f"{prog} {name}"), text[-300:]
    # a default is shown for every option that has one (settings flags say it in their help text)
    for a in parser._actions:
        if a.help != argparse.SUPPRESS and a.default not in (None, argparse.SUPPRESS, False, [], "") \
                and not isinstance(a, argparse._HelpAction):
            assert "default" in parser._get_formatter()._expand_help(a), f"{a.option_strings}: default not shown"


def test_top_level_help_lists_every_command_and_version_works():
    out = subprocess.run([sys.executable, "-m", "slidechat", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name, cmd in SLIDECHAT.items():
        assert f"  {name}" in out.stdout and cmd.summary in out.stdout
    version = subprocess.run([sys.executable, "-m", "slidechat", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("slidechat 0.")


def test_old_flag_spellings_still_work_and_are_hidden():
    from preprocessing.extract import build_parser as extract_parser
    from slidechat.train import config_from_args

    cfg, _ = config_from_args(["--stage", "2", "--data", "d.json", "--out", "o", "--work-dir", "w", "--init", "m1"])
    assert cfg.init == "m1"
    cfg, _ = config_from_args(["--stage", "2", "--data", "d.json", "--out", "o", "--work-dir", "w", "--model", "m2"])
    assert cfg.init == "m2"
    ns = extract_parser().parse_args(["--out", "o", "--checkpoint", "w.bin"])
    assert ns.checkpoint == "w.bin"
    assert "--encoder-checkpoint" in extract_parser().format_help()
    assert "--checkpoint " not in extract_parser().format_help().replace("--encoder-checkpoint", "")
