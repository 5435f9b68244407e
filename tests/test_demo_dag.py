"""The whole demo DAG on a small config, from pytest, with `.venv/bin/snakemake` and no activated venv: every
stage runs, outputs are sane, reruns are no-ops (also after a change of rule code), a change of the
leakage-guard inputs rebuilds the instructions and retrains, each stage target runs alone on a prepared
directory, and the Snakemake report builds. Everything is written under a temporary folder (results and
Snakemake's own `.snakemake/` bookkeeping); the repository is only read."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def snakemake(*args: str, workdir: Path, snakefile: Path = REPO / "Snakefile",
              timeout: int = 1500) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != BIN.resolve())
    return subprocess.run([str(BIN / "snakemake"), "-s", str(snakefile), "--directory", str(workdir), *args],
                          cwd=workdir, capture_output=True, text=True, env=dict(os.environ, PATH=path),
                          timeout=timeout)


def jobs_of(res: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):$", res.stdout + res.stderr, flags=re.M))


def small_config(results: Path) -> dict:
    """The shipped demo config, scaled down: 6 slides of 2048² px, short training."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["demo"].update(train_per_class=1, test_per_class=1, size=2048)
    cfg["train"]["stage1"].update(epochs=1)
    cfg["train"]["stage2"].update(epochs=1)
    cfg["evaluation"]["max_new_tokens"] = 8
    return cfg


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dag")
    results = root / "results"
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(small_config(results)))
    res = snakemake("--cores", "2", "all", "--configfile", str(cfg_path), workdir=root)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return root, results, cfg_path, res


def test_demo_dag_metrics_are_sane(demo_run):
    root, results, _, res = demo_run
    metrics = json.loads((results / "eval" / "demo_slidebench" / "metrics.json").read_text())
    assert metrics["n"] > 0 and metrics["n_skipped_no_features"] == 0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    baselines = metrics["baselines"]
    assert baselines["random"] == 0.25
    for key in ("most_frequent_letter", "per_category_majority"):
        assert 0.0 < baselines[key]["accuracy"] <= 1.0
    assert "Per-rule timing" in res.stdout + res.stderr
    # Every stage left its outputs.
    slides = sorted(p.stem for p in (results / "demo" / "slides").glob("*.svs"))
    assert len(slides) == 6
    for slide in slides:
        assert (results / "segmentation" / f"{slide}.geojson").exists()
        assert (results / "patches" / f"{slide}.h5").exists()
    stores = list((results / "features").glob("*/*.zarr"))
    assert len(stores) == 6
    manifest = json.loads((results / "instructions" / "stage2.manifest.json").read_text())
    assert [Path(b["path"]).name for b in manifest["exclude_benchmarks"]] == ["slidebench_demo.csv"]
    assert (results / "models" / "stage2").is_dir() and (results / "training" / "stage2_curves.png").exists()
    # Checkpoints live outside the declared outputs; Snakemake's bookkeeping stays out of the repository.
    assert (results / "checkpoints" / "stage2").is_dir()
    assert (root / ".snakemake").is_dir()


def _workflow_copy(dest: Path) -> Path:
    """This workflow's definition in `dest` (the repository stays untouched); returns its Snakefile."""
    for name in ("Snakefile", "workflow", "profiles", "envs", "wsicore"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest / "Snakefile"


def test_rerun_is_a_no_op_and_changed_rule_code_does_not_retrain(demo_run, tmp_path):
    root, _, cfg_path, _ = demo_run
    res = snakemake("-n", "all", "--configfile", str(cfg_path), workdir=root)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]
    # The same workflow with the training rules' shell code edited (a trailing shell comment).
    snakefile = _workflow_copy(tmp_path)
    rules = tmp_path / "workflow" / "rules" / "training.smk"
    text = rules.read_text()
    assert text.count('> {log:q} 2>&1"') == 2
    rules.write_text(text.replace('> {log:q} 2>&1"', '> {log:q} 2>&1  # edited"'))
    # The default profile (rerun-triggers: mtime) keeps the trained models ...
    res = snakemake("-n", "all", "--configfile", str(cfg_path), workdir=root, snakefile=snakefile)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]
    # ... where Snakemake's code trigger would retrain them: the edit is one Snakemake sees.
    res = snakemake("-n", "all", "--configfile", str(cfg_path), "--rerun-triggers", "code", workdir=root,
                    snakefile=snakefile)
    assert res.returncode == 0 and {"train_stage1", "train_stage2"} <= jobs_of(res), res.stdout[-3000:]


@pytest.mark.parametrize("change", ["exclude_benchmarks", "benchmarks", "slide_map", "leakage_level"])
def test_leakage_guard_inputs_rebuild_the_instructions_and_retrain(demo_run, tmp_path, change):
    """Under the default profile's mtime trigger, adding a benchmark to exclude or to evaluate (an old file), a
    slide map or another leakage level rebuilds the training instructions and retrains. (The dry run records the changed
    inputs, after which the instructions are out of date: later tests run targets upstream of them.)"""
    root, results, cfg_path, _ = demo_run
    cfg = yaml.safe_load(cfg_path.read_text())
    old = tmp_path / "old.csv"
    shutil.copy(results / "demo" / "instructions" / "slidebench_demo.csv", old)
    os.utime(old, (0, 0))  # older than every output: only the changed set of inputs can trigger a rebuild
    if change == "exclude_benchmarks":
        cfg["instructions"]["exclude_benchmarks"] = [str(old)]
    elif change == "benchmarks":  # a benchmark to evaluate keeps its slides out of training too
        cfg["evaluation"]["benchmarks"] = {"second": str(old)}
    elif change == "slide_map":
        cfg["instructions"]["slide_map"] = str(old)
    else:
        cfg["instructions"]["leakage_level"] = "case"
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "all", "--configfile", str(changed), workdir=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert {"build_instructions_stage", "train_stage1", "train_stage2", "evaluate_benchmark"} <= jobs_of(res)
    assert not {"segment_tissue_slide", "tile_slide", "extract_features_slide"} & jobs_of(res)


def test_each_stage_runs_alone_on_a_prepared_directory(demo_run):
    root, results, cfg_path, _ = demo_run
    shutil.rmtree(results / "patches")
    res = snakemake("--cores", "2", "tile", "--configfile", str(cfg_path), workdir=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert jobs_of(res) == {"tile_slide", "tile"}, jobs_of(res)
    assert len(list((results / "patches").glob("*.h5"))) == 6


def test_report_builds(demo_run):
    root, results, cfg_path, _ = demo_run
    report = results / "report.html"
    res = snakemake("--report", str(report), "--configfile", str(cfg_path), workdir=root)
    assert res.returncode == 0, res.stderr[-3000:]
    text = report.read_text()
    # the slide table is a page of the report; each slide has one overview, a JPEG within the byte budget
    assert '"mime_type": "text/html"' in text and "slides.html" in text
    overviews = sorted((results / "patches").glob("*_patches.jpg"))
    assert len(overviews) == 6 and text.count('"mime_type": "image/jpeg"') == 6
    assert max(p.stat().st_size for p in overviews) <= 40_000
    assert "<td>demo-000</td>" in (results / "summary" / "slides.html").read_text()


def test_report_of_a_partial_run_shows_what_exists(tmp_path):
    """Only segmentation and tiling ran: `snakemake --report` (target all) shows their overviews, no error
    about the outputs of stages that did not run."""
    results = tmp_path / "results"
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(small_config(results)))
    res = snakemake("--cores", "2", "tile", "--configfile", str(cfg_path), workdir=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = tmp_path / "report.html"
    res = snakemake("--report", str(report), "--configfile", str(cfg_path), workdir=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    text = report.read_text()
    assert text.count('"mime_type": "image/jpeg"') == 6 and "slides.html" not in text
