"""Training on two ranks: torchrun + DeepSpeed's CPU accelerator over gloo, the real `slidechat train` command.

Each launch starts two processes (about 20 s on 2 busy cores); the module makes six. The single-process loop
in this process is the reference the ranks must reproduce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing.stores import write_zarr_store
from slidechat import train as T

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DIM = 32
# dropout off: the ranks draw other random numbers than one process does
MODEL = {"feature_dim": DIM, "encoder_layers": 1, "encoder_ffn_dim": 64, "encoder_heads": 4,
         "segment_lengths": [8, 16], "dilated_ratios": [1, 2], "dropout": 0.0, "drop_path_rate": 0.0}
ANSWERS = ["Glands with crowded nuclei.", "Sheets of small lymphocytes.", "Wavy pink collagen fibres.",
           "Fat cells with empty vacuoles."]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path) -> dict[str, Path]:
    """Seven slides' feature stores; records files of 6 (even over 2 ranks) and 7 (uneven) records."""
    root = tmp_path_factory.mktemp("multirank")
    rng = np.random.default_rng(0)
    records = []
    for i in range(7):
        n = 12 + 3 * i
        coords = np.stack([np.arange(n) % 4, np.arange(n) // 4], 1).astype(np.int64) * 224
        x = 2.0 * rng.normal(0, 1, DIM)[None] + rng.normal(0, 1, (n, DIM))
        write_zarr_store(root / "features" / f"s{i}.zarr", x, coords, None, {"encoder": "test"})
        records.append({"id": f"r{i}", "image": [f"s{i}.zarr"], "slide_id": f"s{i}",
                        "conversations": [{"from": "human", "value": "Describe the tissue.\n<image>"},
                                          {"from": "gpt", "value": ANSWERS[i % 4]}]})
    (root / "six.json").write_text(json.dumps(records[:6]))
    (root / "seven.json").write_text(json.dumps(records))
    zero3 = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every parameter, however small
    (root / "zero3.json").write_text(json.dumps(zero3))
    return {"root": root, "llm": tiny_llm, "features": root / "features"}


def _args(env: dict[str, Path], name: str, data: str = "six.json", **kw) -> list[str]:
    settings = {"stage": 1, "data": env["root"] / data, "features-dir": env["features"], "llm": env["llm"],
                "out": env["root"] / name / "model", "work-dir": env["root"] / name / "work", "lr": 0.01,
                "epochs": 1, "grad-accum": 1, "warmup-ratio": 0.0, "seed": 0, "threads": 1,
                "model-config": json.dumps(MODEL), **kw}
    return [a for k, v in settings.items() if v is not None for a in (f"--{k}", str(v))]


def _torchrun(args: list[str], ranks: int = 2, zero: str | Path = "zero2.json") -> subprocess.CompletedProcess:
    """`slidechat train` under this interpreter's torchrun on `ranks` CPU processes."""
    config = zero if Path(zero).is_absolute() else REPO / "configs" / "deepspeed" / str(zero)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone",
           "-m", "slidechat.cli", "train", *args, "--deepspeed", str(config)]
    run_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout + res.stderr


def _visual(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "slide_encoder.safetensors"))


def _log(model_dir: Path) -> list[list[float]]:
    return [[float(v) for v in row.split(",")] for row in (model_dir / "train_log.csv").read_text().splitlines()[1:]]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=f"{k} differs")


@pytest.fixture(scope="module")
def single(env: dict[str, Path]) -> Path:
    """The reference: one process, accumulation 4 over 6 records = a step of 4 micro-batches, then one of 2."""
    cfg, _ = T.config_from_args(_args(env, "single", **{"grad-accum": 4}))
    return T.train(cfg)


@pytest.fixture(scope="module")
def two_ranks(env: dict[str, Path]) -> Path:
    """2 ranks x accumulation 2 over the same records: the same two steps (the second one short)."""
    _ok(_torchrun(_args(env, "two", **{"grad-accum": 2})))
    return env["root"] / "two" / "model"


def test_two_ranks_equal_one_process_with_twice_the_accumulation(single: Path, two_ranks: Path) -> None:
    # the short last window is an optimizer step under DeepSpeed too; weights, losses and norms all agree
    _assert_same(_visual(two_ranks), _visual(single))
    ref, got = _log(single), _log(two_ranks)
    assert [r[0] for r in got] == [r[0] for r in ref] == [1, 2]
    for r, g in zip(ref, got):
        assert g[1] == pytest.approx(r[1], abs=1e-6)  # loss: the mean over both ranks' micro-batches
        assert g[2] == pytest.approx(r[2], rel=1e-9)  # lr
        assert g[5] == pytest.approx(r[5], rel=1e-5)  # the step's own gradient norm
    cfg = json.loads((two_ranks / "training_config.json").read_text())
    assert cfg["grad_accum"] == 2 and cfg["deepspeed"].endswith("zero2.json")


def test_resume_on_two_ranks_and_refuse_another_rank_count(env: dict[str, Path], single: Path) -> None:
    args = _args(env, "resume", **{"grad-accum": 2})
    out = _ok(_torchrun(args + ["--stop-after-step", "1"]))
    assert "stopped after step 1" in out and not (env["root"] / "resume" / "model").exists()
    state = json.loads((env["root"] / "resume" / "work" / "checkpoint-00000001" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 1
    assert sorted(p.name for p in (env["root"] / "resume" / "work" / "checkpoint-00000001").glob("rng_rank*.pt")) \
        == ["rng_rank0.pt", "rng_rank1.pt"]
    out = _ok(_torchrun(args))
    assert out.count("resuming from") == 1 and "(step 1/2)" in out  # said once, by rank 0
    _assert_same(_visual(env["root"] / "resume" / "model"), _visual(single))
    assert [r[0] for r in _log(env["root"] / "resume" / "model")] == [1, 2]
    # the finished run's checkpoints on one rank: refused, naming both rank counts (nothing moved or lost)
    res = _torchrun(args, ranks=1)
    assert res.returncode != 0 and "written by a run on 2 rank(s), this one has 1" in res.stderr
    assert (env["root"] / "resume" / "work" / "checkpoint-00000002").is_dir()


def test_uneven_shards_finish_with_the_same_steps_on_every_rank(env: dict[str, Path]) -> None:
    # 7 records on 2 ranks: the first batch of the epoch is dealt again, so each rank takes 4 steps
    out = _ok(_torchrun(_args(env, "uneven", data="seven.json")))
    assert out.count("do not split evenly over 2 ranks") == 1  # a note is printed once, not once per rank
    steps = [r[0] for r in _log(env["root"] / "uneven" / "model")]
    assert steps == [1, 2, 3, 4]
    order = T.epoch_order(7, 0, 0)
    assert T.micro_batches(7, 1, 0, 1, 0, 2) == [[order[i]] for i in (0, 2, 4, 6)]
    assert T.micro_batches(7, 1, 0, 1, 1, 2) == [[order[i]] for i in (1, 3, 5, 0)]


def test_zero3_stage2_writes_the_model_and_keeps_fp32_slide_encoder(env: dict[str, Path], single: Path) -> None:
    from slidechat.checkpoint import load_model

    # stage 2 under ZeRO-3 with every parameter sharded and bf16 on; lr 0, so the saved model must be the start
    _ok(_torchrun(_args(env, "zero3", stage=2, init=single, lr=0.0) + ["--bf16"],
                  zero=env["root"] / "zero3.json"))
    out = env["root"] / "zero3" / "model"
    # the slide encoder and projector come back in fp32, bit for bit, not as DeepSpeed's bf16 copies
    _assert_same(_visual(out), _visual(single), atol=0)
    start = load_model(single, llm=env["llm"])
    saved = load_model(out, llm=env["llm"])
    assert json.loads((out / "slidechat_config.json").read_text())["llm_format"] == "full"
    for k, v in start.llm.state_dict().items():  # the LLM gathered from its shards, in 16 bits
        torch.testing.assert_close(saved.llm.state_dict()[k].float(), v.bfloat16().float(), rtol=0, atol=0,
                                   msg=f"LLM weight {k}")


def test_gpu_check_cpu_branch(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py at its CPU sizes: every check passes (4-bit is skipped without CUDA)."""
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert res.returncode == 0, res.stdout + res.stderr[-5000:]
    status = {r["check"]: r["status"] for r in json.loads(out.read_text())["results"]}
    assert status == {"extraction": "PASS", "longnet": "PASS", "stage1": "PASS", "stage1_4bit": "SKIP",
                      "stage2": "PASS", "stage2_lora": "PASS", "zero2": "PASS", "generate": "PASS", "llm7b": "PASS"}
    assert res.stdout.count("PASS ") == 8 and "0 failed" in res.stdout
