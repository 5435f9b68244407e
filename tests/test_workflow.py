"""The Snakemake workflow: lint, config validation, SLURM profile, conda env pins, stage targets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        [str(BIN / "snakemake"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )


def test_lint_is_clean():
    res = snakemake("--lint")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations, your workflow is in a good condition!" in res.stdout + res.stderr


def test_snakefmt_is_clean():
    res = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_default_config_has_every_stage(tmp_path):
    res = snakemake("-n", "all", "--quiet", "rules", "--config", f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    for rule in ("make_demo_slides", "segment_tissue_slide", "tile_slide", "extract_features_slide",
                 "build_instructions_stage", "train_stage1", "train_stage2", "evaluate_benchmark"):
        assert rule in res.stdout, rule


def test_stage_targets_are_wildcard_free_rules():
    res = snakemake("--list-target-rules")
    assert res.returncode == 0, res.stderr
    listed = set(res.stdout.split())
    for target in ("all", "segment_tissue", "tile", "extract_features", "build_instructions", "train_stage1",
                   "train_stage2", "evaluate"):
        assert target in listed, target


def test_bad_config_value_is_a_clear_error(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["tiling"]["min_tissue_fraction"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--configfile", str(bad), "--config", f"results_dir={tmp_path}")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "['tiling']['min_tissue_fraction']" in out and "2 is greater than the maximum of 1" in out


def test_real_run_without_llm_names_the_key(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.svs").write_bytes(b"x")
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["slides"]["dir"] = str(slides)
    cfg["features"]["encoder"] = "conch_tiny"
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "tile", "--configfile", str(path))
    assert res.returncode != 0 and "llm.path is required" in res.stdout + res.stderr


def test_slides_discovered_from_folder_and_sample_sheet(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("b.svs", "a.ndpi", "c.SVS", "notes.txt"):
        (slides / name).write_bytes(b"x")
    llm = tmp_path / "llm"
    llm.mkdir()
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["slides"]["dir"] = str(slides)
    cfg["llm"]["path"] = str(llm)
    cfg["instructions"]["stage1"] = cfg["instructions"]["stage2"] = str(tmp_path / "x.json")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "tile", "--configfile", str(path))
    assert res.returncode == 0, res.stderr
    jobs = re.findall(r"wildcards: slide=(\S+)", res.stdout)
    assert sorted(set(jobs)) == ["a", "b", "c"]
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide_id,path,mpp,split\nfirst,{slides / 'b.svs'},0.25,train\nsecond,{slides / 'a.ndpi'},,test\n")
    cfg["slides"]["sample_sheet"] = str(sheet)
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "tile", "--configfile", str(path))
    assert res.returncode == 0, res.stderr
    assert sorted(set(re.findall(r"wildcards: slide=(\S+)", res.stdout))) == ["first", "second"]
    assert "--mpp 0.25" in res.stdout  # the sheet's mpp becomes an override for that slide
    sheet.write_text("slide_id,path\nbad id,x.svs\n")
    res = snakemake("-n", "tile", "--configfile", str(path))
    assert res.returncode != 0 and "slide_id" in res.stdout + res.stderr


def test_slurm_profile_dry_run(tmp_path):
    res = snakemake("-n", "--profile", "profiles/slurm", "all", "--config", f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "extract_features_slide" in res.stdout


def _sbatch_for(rule: str, threads: int, rule_resources: dict) -> str:
    """The plugin's own sbatch string for a rule, with the SLURM profile's resources applied."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    resources = dict(profile["default-resources"])
    resources.update(rule_resources)
    resources.update(profile["set-resources"][rule])

    class Resources(dict):
        __getattr__ = dict.get

    job = SimpleNamespace(resources=Resources(resources), threads=threads, name=rule, is_group=lambda: False)
    params = dict(run_uuid="uuid", slurm_logfile="log", comment_str=rule, workdir="/w",
                  account=f"-A {resources['slurm_account']}", partition=f"-p {resources['slurm_partition']}")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    return get_submit_command(job, params) + set_gres_string(job)


def test_slurm_sbatch_for_extraction_and_stage2():
    extract = _sbatch_for("extract_features_slide", threads=1, rule_resources={"gpu": 1, "mem_mb": 8000})
    assert "--gpus=1" in extract and "--cpus-per-gpu=8" in extract
    assert "-p CHANGE_ME_gpu_partition" in extract and "--mem 32000" in extract
    stage2 = _sbatch_for("train_stage2", threads=2, rule_resources={"gpu": 0, "mem_mb": 32000})
    assert "--nodes=2" in stage2 and "--ntasks-per-node=8" in stage2
    assert "--ntasks-per-gpu" not in stage2 and "--gpus-per-node=8" in stage2
    assert "--cpus-per-task=8" in stage2
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["set-resources"]["train_stage2"]["mpi"] == "srun"
    assert profile["groups"]["extract_features_slide"] in profile["group-components"]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lstrip("- ").lower()] = version.strip()
    return pins


@pytest.mark.parametrize("env", ["preprocessing", "features", "training"])
def test_conda_env_pins_agree_with_pyproject(env):
    constraints = _pins(REPO / "constraints.txt")
    spec = yaml.safe_load((REPO / "envs" / f"{env}.yaml").read_text())
    assert spec["channels"] == ["conda-forge", "pytorch", "nvidia"]
    pip_section = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    assert "-e .." in pip_section  # our package, installed into the env
    env_pins = {}
    for item in pip_section:
        if "==" in item:
            name, version = item.split("==")
            env_pins[name.lower()] = version
    for name, version in env_pins.items():
        assert constraints.get(name) == version, f"{env}.yaml pins {name}=={version}, constraints.txt {constraints.get(name)}"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[<>=!\[ ;]", dep)[0].lower()
        assert name in env_pins, f"{env}.yaml lacks pyproject dependency {name}"
        assert name in constraints, f"constraints.txt lacks {name}"
