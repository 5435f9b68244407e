"""The conda environment of the rules (--use-conda) is pinned exactly as constraints.txt and pyproject.toml say."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("- ").strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!\[ ;]", requirement)[0].lower()


def test_every_rule_uses_the_one_environment():
    envs = sorted(p.name for p in (REPO / "envs").glob("*.yaml"))
    assert envs == ["slidechat.yaml"]
    used = set()
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        used |= set(re.findall(r'"\.\./\.\./envs/([^"]+)"', rules.read_text()))
    assert used == {"slidechat.yaml"}


def test_environment_pins_agree_with_constraints_and_pyproject():
    constraints = _pins((REPO / "constraints.txt").read_text().splitlines())
    spec = yaml.safe_load((REPO / "envs" / "slidechat.yaml").read_text())
    assert spec["channels"] == ["conda-forge", "pytorch", "nvidia"]
    python = next(d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11"  # the version constraints.txt is resolved for
    pip_section = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    # No local paths: conda runs this pip section from a copy of the file under .snakemake/conda/ (a relative
    # path names the wrong folder); the jobs import our package from the checkout (test_user_path.py).
    assert not [item for item in pip_section if item.startswith(("-e", ".", "/"))], pip_section
    env_pins = _pins(pip_section)
    unpinned = [item for item in pip_section if "==" not in item]
    assert not unpinned, f"envs/slidechat.yaml: unpinned {unpinned}"
    for name, version in env_pins.items():
        assert constraints.get(name) == version, f"slidechat.yaml pins {name}=={version}, constraints.txt {constraints.get(name)}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # Everything the rules run: the dependencies and DeepSpeed (multi-GPU training).
    needed = [_requirement_name(d) for d in project["dependencies"] + project["optional-dependencies"]["deepspeed"]]
    for name in needed:
        assert name in env_pins, f"envs/slidechat.yaml lacks {name}"
        assert name in constraints, f"constraints.txt lacks {name}"
