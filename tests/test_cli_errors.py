"""Bad invocations of every command, as a user makes them: each ends with a non-zero exit code and at most a
few lines on stderr that name the file, slide, flag or key at fault; never a traceback (wsicore.errors).

Most cases run in-process through the two dispatchers; a representative subset also runs as a real process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing.__main__ import main as preprocessing_main
from preprocessing.stores import write_zarr_store
from slidechat.checkpoint import new_model, save_model
from slidechat.cli import main as slidechat_main
from slidechat.model import SlideChatConfig
from wsicore.errors import WORKFLOW_ENV

MAX_LINES = 3
BENCH_COLUMNS = "ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_llm) -> dict[str, Path]:
    """Broken and mismatched inputs, and a small valid model and store to pair them with."""
    root = tmp_path_factory.mktemp("bad_inputs")
    p = {"root": root, "llm": tiny_llm}
    p["empty"] = root / "empty.json"
    p["empty"].write_text("")
    p["malformed"] = root / "malformed.json"
    p["malformed"].write_text('{"records": [1,\n')
    p["text"] = root / "notes.pt"
    p["text"].write_text("these are my notes, not a checkpoint\n")
    p["zero"] = root / "zero.pt"
    p["zero"].write_bytes(b"")
    p["truncated"] = root / "truncated.pt"
    torch.save({"projector.model.0.weight": torch.zeros(64, 64)}, p["truncated"])
    p["truncated"].write_bytes(p["truncated"].read_bytes()[:300])
    p["folder"] = root / "a_folder"
    p["folder"].mkdir()
    p["short_csv"] = root / "short.csv"
    p["short_csv"].write_text("x,y\n1,2\n")
    p["bench"] = root / "bench.csv"
    p["bench"].write_text(BENCH_COLUMNS + "0,S1,X,Morphology,Tissue,What tissue?,a,b,c,d,A\n")
    p["outputs"] = root / "outputs.csv"
    p["outputs"].write_text("ID,Output\n0,A\n")
    p["yaml"] = root / "train.yaml"
    p["yaml"].write_text("lr: [0.1\n")
    p["train_json"] = root / "train.json"
    p["train_json"].write_text(json.dumps([{"id": "0", "image": ["S1.zarr"], "conversations": [
        {"from": "human", "value": "<image>\nWhat tissue?"}, {"from": "gpt", "value": "Stroma."}]}]))
    # a small model (512-d features) and stores: good, of another width, and with a damaged chunk
    torch.manual_seed(0)
    cfg = SlideChatConfig(feature_dim=512, encoder_layers=1, encoder_ffn_dim=64, encoder_heads=4,
                          segment_lengths=[16, 32], dilated_ratios=[1, 2])
    p["model"] = save_model(new_model(tiny_llm, cfg), root / "model")
    attrs = {"encoder": "conch_tiny", "transform": "slidechat", "target_mpp": 0.5, "patch_size": 224}
    rng = np.random.default_rng(0)
    for name, dim, encoder in (("good", 512, "conch_v1"), ("wide", 768, "timm:vit_base")):
        write_zarr_store(root / name / "S1.zarr", rng.random((6, dim), np.float32), np.zeros((6, 2), np.int64), None,
                         {**attrs, "encoder": encoder})
    shutil.copytree(root / "good", root / "damaged")
    chunk = next(f for f in (root / "damaged" / "S1.zarr" / "features").rglob("*") if f.is_file()
                 and f.name != "zarr.json")
    chunk.write_bytes(b"\x00" * 40)
    # a model whose weights file is cut short
    shutil.copytree(p["model"], root / "cut_model")
    weights = root / "cut_model" / "slide_encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    p["cut_model"] = root / "cut_model"
    return p


def _cases(p: dict[str, Path], slides: Path) -> list[tuple[str, list[str], list[str]]]:
    """(dispatcher, argv, strings the message must hold)."""
    cmu = str(slides / "CMU-1-Small-Region.svs")
    tcga = str(slides / "tcga-cr-7395-01a-01-ts1.svs")
    r = p["root"]
    s = {k: str(v) for k, v in p.items()}
    out = str(r / "out")
    train_out = str(r / "model-out")  # `out` is written by earlier cases; train refuses to replace it
    return [
        # slidechat score
        ("slidechat", ["score", "--benchmark", s["malformed"], "--outputs", s["outputs"], "--out", out],
         ["malformed.json", "not valid JSON", "line 2"]),
        ("slidechat", ["score", "--benchmark", s["short_csv"], "--outputs", s["outputs"], "--out", out],
         ["short.csv", "missing column"]),
        ("slidechat", ["score", "--benchmark", s["empty"], "--outputs", s["outputs"], "--out", out],
         ["empty.json", "empty"]),
        ("slidechat", ["score", "--benchmark", s["bench"], "--outputs", s["short_csv"], "--out", out],
         ["short.csv", "Output"]),
        ("slidechat", ["score", "--benchmark", s["bench"], "--outputs", s["folder"], "--out", out],
         ["a_folder", "is a folder"]),
        ("slidechat", ["score", "--benchmark", str(r / "absent.csv"), "--outputs", s["outputs"], "--out", out],
         ["absent.csv", "--benchmark"]),
        ("slidechat", ["score", "--benchmark", s["bench"], "--outputs", s["outputs"], "--out", out,
                       "--train-manifest", s["malformed"]], ["malformed.json", "--train-manifest"]),
        ("slidechat", ["score", "--benchmark", s["bench"], "--outputs", s["outputs"], "--out", out,
                       "--judge", "no_such_module:judge"], ["--judge", "no_such_module"]),
        # slidechat build-instructions
        ("slidechat", ["build-instructions", "--input", s["empty"], "--features-dir", str(r / "good"), "--out", out],
         ["empty.json", "--input"]),
        ("slidechat", ["build-instructions", "--input", s["malformed"], "--features-dir", str(r / "good"),
                       "--out", out], ["malformed.json", "not valid JSON", "--input"]),
        ("slidechat", ["build-instructions", "--input", s["train_json"], "--features-dir", str(r / "good"),
                       "--out", out, "--exclude-benchmark", s["folder"]], ["a_folder", "--exclude-benchmark"]),
        ("slidechat", ["build-instructions", "--input", s["train_json"], "--features-dir", str(r / "good"),
                       "--out", out, "--exclude-benchmark", str(r / "absent.csv")],
         ["absent.csv", "--exclude-benchmark"]),
        # slidechat convert-checkpoint
        ("slidechat", ["convert-checkpoint", s["zero"], out], ["zero.pt", "empty"]),
        ("slidechat", ["convert-checkpoint", s["text"], out], ["notes.pt", "torch"]),
        ("slidechat", ["convert-checkpoint", s["truncated"], out], ["truncated.pt"]),
        # slidechat ask / chat
        ("slidechat", ["ask", "--slide", s["text"], "--question", "q", "--model", s["model"], "--encoder", "conch_tiny",
                       "--work-dir", str(r / "cache")], ["notes.pt", "OpenSlide cannot open"]),
        ("slidechat", ["ask", "--slide", cmu, "--question", "q", "--model", s["folder"]], ["a_folder", "--model"]),
        ("slidechat", ["ask", "--slide", cmu, "--question", "q", "--model", str(r / "absent_model")],
         ["absent_model", "--model"]),
        ("slidechat", ["ask", "--slide", cmu, "--question", "q", "--model", s["model"], "--llm", str(r / "no_llm")],
         ["no_llm", "--llm"]),
        ("slidechat", ["ask", "--slide", cmu, "--question", "q", "--model", s["model"], "--llm", s["folder"],
                       "--features", str(r / "good" / "S1.zarr")], ["a_folder", "--llm"]),
        ("slidechat", ["ask", "--slide", cmu, "--question", "q", "--model", s["model"],
                       "--features", str(r / "wide" / "S1.zarr")], ["slide S1", "768-d", "512-d"]),
        ("slidechat", ["ask", "--slide", cmu, "--question", "q", "--model", s["model"],
                       "--features", str(r / "damaged" / "S1.zarr")], ["S1.zarr", "damaged", "slide S1"]),
        ("slidechat", ["ask", "--slide", cmu, "--question", "q", "--model", s["model"], "--encoder", "conch_v1"],
         ["--encoder-checkpoint"]),
        ("slidechat", ["chat", "--slide", tcga, "--model", s["model"], "--encoder", "conch_tiny",
                       "--work-dir", str(r / "cache_tcga")], ["tcga-cr-7395-01a-01-ts1", "--mpp"]),
        ("slidechat", ["ask", "--slide", cmu, "--question"], ["--question"]),
        # slidechat evaluate
        ("slidechat", ["evaluate", "--benchmark", s["bench"], "--features-dir", str(r / "good"),
                       "--model", str(r / "absent_model"), "--out-dir", out], ["absent_model", "--model"]),
        ("slidechat", ["evaluate", "--benchmark", s["bench"], "--features-dir", str(r / "damaged"),
                       "--model", s["model"], "--out-dir", out], ["S1.zarr", "damaged"]),
        ("slidechat", ["evaluate", "--benchmark", s["bench"], "--features-dir", str(r / "wide"),
                       "--model", s["model"], "--out-dir", out], ["slide S1", "768-d"]),
        ("slidechat", ["evaluate", "--benchmark", s["bench"], "--features-dir", str(r / "good"),
                       "--model", s["cut_model"], "--out-dir", out], ["slide_encoder.safetensors"]),
        ("slidechat", ["evaluate", "--benchmark", s["bench"], "--features-dir", str(r / "absent_features"),
                       "--model", s["model"], "--out-dir", out], ["absent_features", "--features-dir"]),
        # slidechat train
        ("slidechat", ["train", "--stage", "1", "--data", s["malformed"], "--llm", s["llm"], "--out", train_out,
                       "--work-dir", str(r / "work")], ["malformed.json", "--data"]),
        ("slidechat", ["train", "--stage", "2", "--data", s["train_json"], "--out", train_out, "--work-dir",
                       str(r / "work")], ["--model"]),
        ("slidechat", ["train", "--stage", "1", "--data", s["train_json"], "--llm", s["folder"], "--out", train_out,
                       "--work-dir", str(r / "work")], ["a_folder", "--llm"]),
        ("slidechat", ["train", "--stage", "1", "--config", s["yaml"], "--data", s["train_json"], "--llm", s["llm"],
                       "--out", train_out, "--work-dir", str(r / "work")], ["train.yaml", "line 2", "--config"]),
        ("slidechat", ["train", "--stage", "1", "--data", s["train_json"], "--llm", s["llm"], "--out", train_out,
                       "--work-dir", str(r / "work"), "--model-config", "{not json"], ["--model-config"]),
        ("slidechat", ["train", "--stage", "3"], ["--stage"]),
        # the rest of slidechat
        ("slidechat", ["report", "--metrics", s["malformed"]], ["malformed.json", "--metrics"]),
        ("slidechat", ["report", "--metrics", s["outputs"]], ["outputs.csv", "--metrics"]),
        ("slidechat", ["make-tiny-llm", "--out", out, "--corpus", str(r / "absent.txt")], ["absent.txt", "--corpus"]),
        ("slidechat", ["demo-instructions", "--labels", s["short_csv"], "--out", out], ["short.csv", "--labels"]),
        ("slidechat", ["frobnicate"], ["unknown command 'frobnicate'"]),
        ("slidechat", ["evalute"], ["unknown command 'evalute'", "evaluate"]),
        # python -m preprocessing
        ("preprocessing", ["segment", "--slide", s["text"], "--out", out], ["notes.pt", "OpenSlide cannot open"]),
        ("preprocessing", ["segment", "--slide", str(r / "absent.svs"), "--out", out], ["absent.svs", "not found"]),
        ("preprocessing", ["segment", "--slide", cmu, "--out", out, "--preset", "clam_tgca"], ["--preset", "clam_tgca"]),
        ("preprocessing", ["tile", "--slide", tcga, "--out", out], ["tcga-cr-7395-01a-01-ts1", "--mpp"]),
        ("preprocessing", ["tile", "--slide", cmu, "--out", out, "--seg-dir", s["folder"]], ["--seg-dir", "segment"]),
        ("preprocessing", ["tile", "--slide", cmu, "--out", out, "--target-mpp", "-1"], ["--target-mpp"]),
        ("preprocessing", ["extract", "--slide", cmu, "--coords", s["text"], "--encoder", "conch_tiny", "--out", out],
         ["notes.pt", "coords"]),
        ("preprocessing", ["extract", "--slide", cmu, "--coords", str(r / "absent.h5"), "--encoder", "conch_tiny",
                           "--out", out], ["absent.h5"]),
        # the wrong path is named before the encoder (here one that needs weights) is built
        ("preprocessing", ["extract", "--slide", str(r / "absent.svs"), "--coords", s["text"], "--encoder", "conch_v1",
                           "--out", out], ["absent.svs", "--slide"]),
        ("preprocessing", ["extract", "--manifest", s["short_csv"], "--out", out], ["short.csv", "--manifest"]),
        ("preprocessing", ["extract", "--slide", cmu, "--out", out], ["--coords"]),
        ("preprocessing", ["extract", "--slide", cmu, "--coords", s["folder"], "--encoder", "conch_tiny", "--out", out],
         ["a_folder", "is a folder", "--coords"]),
        ("preprocessing", ["extract", "--slide", cmu, "--coords", s["text"], "--encoder", "conch_tiny",
                           "--out", s["outputs"]], ["outputs.csv", "is a file", "--out"]),
        ("preprocessing", ["tile", "--slide", cmu, "--out", s["outputs"]], ["outputs.csv", "is a file"]),
        ("preprocessing", ["segment", "--slide", cmu, "--out", str(r / "outputs.csv" / "seg")],
         ["outputs.csv", "cannot make"]),
        ("preprocessing", ["synth", "--out", s["outputs"]], ["outputs.csv", "is a file", "--out"]),
        ("preprocessing", ["summary", "--seg-dir", out, "--patch-dir", str(r / "absent"), "--features-dir", out,
                           "--bench-dir", out, "--out", str(r / "t.tsv")], ["absent", "--patch-dir"]),
        ("preprocessing", ["import-csv", str(r / "absent.csv"), str(r / "x.zarr")], ["absent.csv"]),
        ("preprocessing", ["import-csv", s["short_csv"], str(r / "x.zarr")], ["short.csv", "feature columns"]),
        ("preprocessing", ["export-csv", s["folder"], str(r / "x.csv")], ["a_folder"]),
        ("preprocessing", ["seal-store", s["folder"]], ["could not be sealed"]),
    ]


DISPATCH = {"slidechat": slidechat_main, "preprocessing": preprocessing_main}


def _check(rc: int, err: str, needles: list[str], where: str) -> None:
    assert rc not in (0, None), f"{where}: exit code {rc}"
    assert "Traceback" not in err, f"{where}: a traceback for a user mistake:\n{err}"
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= MAX_LINES, f"{where}: {len(lines)} lines on stderr:\n{err}"
    assert "error:" in lines[-1], f"{where}: {err}"
    missing = [n for n in needles if n not in err]
    assert not missing, f"{where}: the message does not name {missing}:\n{err}"
    assert "config.yaml" not in err, f"{where}: a command's error names config.yaml:\n{err}"


@pytest.fixture(scope="module")
def cases(bad, cmu_small, tcga_jp2k_no_mpp) -> list[tuple[str, list[str], list[str]]]:
    return _cases(bad, cmu_small.parent)


def test_bad_invocations_end_in_one_clear_line(cases, capsys, monkeypatch):
    monkeypatch.delenv(WORKFLOW_ENV, raising=False)
    monkeypatch.delenv("WSI_DEBUG", raising=False)
    failures = []
    for prog, argv, needles in cases:
        where = f"{prog} {' '.join(argv)}"
        try:
            rc = DISPATCH[prog](argv)
        except SystemExit as stop:  # argparse's own exit for a bad flag
            rc = stop.code
        except Exception as exc:  # noqa: BLE001 - the test lists every case that escapes the convention
            capsys.readouterr()
            failures.append(f"{where}: raised {type(exc).__name__}: {exc}")
            continue
        err = capsys.readouterr().err
        try:
            _check(rc, err, needles, where)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)


# the first case of these commands also runs as a process of its own
AS_PROCESSES = ("score", "build-instructions", "convert-checkpoint", "ask", "evaluate", "frobnicate", "segment")


def test_bad_invocations_as_real_processes(cases):
    env = {k: v for k, v in os.environ.items() if k not in (WORKFLOW_ENV, "WSI_DEBUG")}
    for command in AS_PROCESSES:
        prog, argv, needles = next(c for c in cases if c[1][0] == command)
        module = "slidechat" if prog == "slidechat" else "preprocessing"
        res = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env)
        _check(res.returncode, res.stderr, needles, f"{module} {' '.join(argv)}")
        assert res.returncode == 2


def test_the_workflow_adds_the_config_key_and_debug_adds_the_traceback(cases, tcga_jp2k_no_mpp, tmp_path):
    argv = [sys.executable, "-m", "preprocessing", "tile", "--slide", str(tcga_jp2k_no_mpp), "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in (WORKFLOW_ENV, "WSI_DEBUG")}
    plain = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert "--mpp" in plain.stderr and "mpp_overrides" not in plain.stderr
    workflow = subprocess.run(argv, capture_output=True, text=True, env={**env, WORKFLOW_ENV: "1"})
    assert workflow.returncode == 2 and "workflow config:" in workflow.stderr and "mpp_overrides" in workflow.stderr
    assert len(workflow.stderr.strip().splitlines()) == 1
    debug = subprocess.run(argv[:4] + ["--debug"] + argv[4:], capture_output=True, text=True, env=env)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "MissingMppError" in debug.stderr
