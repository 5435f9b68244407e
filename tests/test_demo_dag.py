"""The whole demo DAG on a small config, from pytest: every stage runs, outputs are sane, reruns are no-ops,
each stage target runs alone on a prepared directory, and the Snakemake report builds."""

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


def snakemake(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


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
    res = snakemake("--cores", "2", "all", "--configfile", str(cfg_path))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return results, cfg_path, res


def test_demo_dag_metrics_are_sane(demo_run):
    results, _, res = demo_run
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
    assert manifest  # written beside the training data
    assert (results / "models" / "stage2").is_dir() and (results / "training" / "stage2_curves.png").exists()
    # Checkpoints live outside the declared outputs.
    assert (results / "checkpoints" / "stage2").is_dir()


def test_rerun_is_a_no_op_and_touching_code_does_not_retrain(demo_run):
    _, cfg_path, _ = demo_run
    res = snakemake("-n", "all", "--configfile", str(cfg_path))
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]
    os.utime(REPO / "slidechat" / "train.py")  # the default profile sets rerun-triggers: mtime
    res = snakemake("-n", "all", "--configfile", str(cfg_path))
    assert "Nothing to be done" in res.stdout + res.stderr


def test_each_stage_runs_alone_on_a_prepared_directory(demo_run):
    results, cfg_path, _ = demo_run
    shutil.rmtree(results / "patches")
    res = snakemake("--cores", "2", "tile", "--configfile", str(cfg_path))
    assert res.returncode == 0, res.stderr[-3000:]
    ran = set(re.findall(r"^(?:local)?rule (\w+):$", res.stdout + res.stderr, flags=re.M))
    assert ran == {"tile_slide", "tile"}, ran
    assert len(list((results / "patches").glob("*.h5"))) == 6


def test_report_builds(demo_run):
    results, cfg_path, _ = demo_run
    report = results / "report.html"
    res = snakemake("--report", str(report), "--configfile", str(cfg_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert report.stat().st_size > 10_000
