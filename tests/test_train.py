"""Training: label masking, what each stage trains, overfitting, kill + resume, NaN stop, DeepSpeed, launcher.

Everything runs on a tiny random Qwen2 LLM and a 1-layer slide encoder over 32-d simulated features.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing.stores import PROVENANCE_KEYS, read_store_attrs, write_h5_store, write_zarr_store
from slidechat import train as T
from slidechat.cli import main as cli
from slidechat.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from wsicore.errors import InputError

DIM = 32
MODEL = {"feature_dim": DIM, "encoder_layers": 1, "encoder_ffn_dim": 64, "encoder_heads": 4,
         "segment_lengths": [8, 16], "dilated_ratios": [1, 2]}
ANSWERS = ["Glands with crowded nuclei.", "Sheets of small lymphocytes.", "Wavy pink collagen fibres.",
           "Fat cells with empty vacuoles."]
QUESTIONS = ["What does the slide show?", "Describe the tissue.", "Which tissue is this?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than two, and much faster on a busy CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path) -> dict[str, Path]:
    """The tiny LLM, four slides' feature stores and a records file (one record per slide)."""
    root = tmp_path_factory.mktemp("train")
    llm = tiny_llm
    rng = np.random.default_rng(0)
    feats = root / "features"
    records = []
    for i, answer in enumerate(ANSWERS):
        n = 12 + 5 * i
        coords = np.stack([np.arange(n) % 4, np.arange(n) // 4], 1).astype(np.int64) * 224
        x = 2.0 * rng.normal(0, 1, DIM)[None] + rng.normal(0, 1, (n, DIM))
        write_zarr_store(feats / f"s{i}.zarr", x, coords, None, {"encoder": "test"})
        records.append({"id": f"r{i}", "image": [f"s{i}.zarr"], "slide_id": f"s{i}",
                        "conversations": [{"from": "human", "value": f"{QUESTIONS[i % 3]}\n<image>"},
                                          {"from": "gpt", "value": answer}]})
    data = root / "data.json"
    data.write_text(json.dumps(records))
    return {"root": root, "llm": llm, "features": feats, "data": data}


def _cfg(env: dict[str, Path], name: str, **kw) -> T.TrainConfig:
    base = dict(stage=1, data=str(env["data"]), features_dir=str(env["features"]), llm=str(env["llm"]),
                out=str(env["root"] / name / "model"), work_dir=str(env["root"] / name / "work"), lr=1e-2,
                epochs=1, grad_accum=1, warmup_ratio=0.0, seed=0, save_steps=1000, model=dict(MODEL))
    base.update(kw)
    return T.TrainConfig(**base)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def test_label_masking_token_by_token(env: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["llm"])
    conv = [{"from": "human", "value": "<image>\nDescribe the tissue."}, {"from": "gpt", "value": ANSWERS[0]},
            {"from": "human", "value": "Which tissue is this?"}, {"from": "gpt", "value": ANSWERS[1]}]
    ds = T.InstructionDataset([{"id": "x", "slide_id": "s0", "image": ["s0.zarr"], "conversations": conv}], tok,
                              features_dir=str(env["features"]))
    item = ds[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and item["features"].shape == (12, DIM)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # Expected: exactly the two replies (each followed by <|im_end|>) carry labels, in order, equal to the ids.
    replies = [tok.encode(a, add_special_tokens=False) + [im_end] for a in (ANSWERS[0], ANSWERS[1])]
    supervised = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert [ids[i] for i in supervised] == replies[0] + replies[1]
    assert all(labels[i] == ids[i] for i in supervised)
    # The supervised positions are two contiguous runs, each right after "<|im_start|>assistant\n".
    runs = np.split(np.array(supervised), np.flatnonzero(np.diff(supervised) > 1) + 1)
    assert [len(r) for r in runs] == [len(r) for r in replies]
    prefix = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for r in runs:
        assert ids[r[0] - len(prefix): r[0]] == prefix
    text = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX and i >= 0])
    assert "Which tissue is this?" in text and ANSWERS[0] not in text
    # Collation pads ids with the pad id and labels with -100.
    short = dict(item, input_ids=item["input_ids"][:5], labels=item["labels"][:5])
    batch = T.collate([item, short], pad_token_id=7)
    assert batch["input_ids"].shape == (2, len(ids))
    assert (batch["labels"][1, 5:] == IGNORE_INDEX).all() and (batch["input_ids"][1, 5:] == 7).all()
    assert batch["attention_mask"][1].sum() == 5


def test_a_record_cut_before_its_reply_trains_on_with_a_note(env: dict[str, Path], capsys) -> None:
    """max_length cuts the reply of a long record: a note and no loss from it, not a 'diverged' stop at NaN."""
    records = json.loads(env["data"].read_text())[:2]
    long_question = " ".join(["Describe the tissue in detail please."] * 30)
    records[0]["conversations"][0]["value"] = "<image>\n" + long_question
    data = env["root"] / "cut.json"
    data.write_text(json.dumps(records))
    cfg = _cfg(env, "cut", data=str(data), max_length=48, seed=3)
    T.train(cfg)
    assert "record r0: --max-length 48 cuts off all of its replies" in capsys.readouterr().out
    losses = [float(r.split(",")[1]) for r in (Path(cfg.out) / "train_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and 0.0 in losses


def test_stage1_freezes_llm_stage2_trains_all(env: dict[str, Path]) -> None:
    from slidechat.checkpoint import load_model, new_model

    before = new_model(env["llm"], _model_cfg())
    llm_before = {k: v.clone() for k, v in before.llm.state_dict().items()}
    T.train(_cfg(env, "s1", max_steps=3))
    s1 = load_model(env["root"] / "s1" / "model", llm=env["llm"])
    for k, v in s1.llm.state_dict().items():
        assert torch.equal(v, llm_before[k]), f"stage 1 changed LLM parameter {k}"
    assert not torch.equal(s1.projector.model[0].weight, before.projector.model[0].weight)

    T.train(_cfg(env, "s2", stage=2, init=str(env["root"] / "s1" / "model"), lr=1e-3, max_steps=3))
    s2 = load_model(env["root"] / "s2" / "model", llm=env["llm"])
    a, b = _state(s1), _state(s2)
    groups = T.parameter_groups(s2)
    for group, params in groups.items():
        changed = [n for n, _ in params if not torch.equal(a[n], b[n])]
        assert len(changed) == len(params), f"stage 2 left {group} parameters unchanged: " \
                                            f"{sorted(set(n for n, _ in params) - set(changed))[:5]}"
    log = (env["root"] / "s2" / "model" / "train_log.csv").read_text().splitlines()
    assert log[0] == ",".join(T.LOG_COLUMNS) and len(log) == 4
    assert (env["root"] / "s2" / "model" / "training_curves.png").stat().st_size > 1000
    assert list((env["root"] / "s2" / "work" / "tensorboard").glob("events.out.tfevents.*"))


def _model_cfg():
    from slidechat.model import SlideChatConfig

    return SlideChatConfig(**MODEL)


def test_lora_trains_adapters_only(env: dict[str, Path]) -> None:
    pytest.importorskip("peft")
    if not (env["root"] / "s1" / "model").exists():
        T.train(_cfg(env, "s1", max_steps=3))
    model = T.build_model(_cfg(env, "lora", stage=2, init=str(env["root"] / "s1" / "model"), lora=True,
                               lora_r=4, lora_alpha=8).resolved())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or not n.startswith("llm.") for n in trainable)
    assert any(n.startswith("LongNet_encoder.") for n in trainable) and any("lora_" in n for n in trainable)


def test_overfit_then_generate(env: dict[str, Path]) -> None:
    from preprocessing.stores import load_features
    from slidechat.checkpoint import load_model

    records = json.loads(env["data"].read_text())[:3]
    small = env["root"] / "three.json"
    small.write_text(json.dumps(records))
    # Stage 1 with a frozen random LLM cannot memorise text: overfit in stage 2 from a stage-1 start
    # (dropout off, so that the loss can really reach zero).
    T.train(_cfg(env, "overfit1", data=str(small), max_steps=1,
                 model={**MODEL, "dropout": 0.0, "drop_path_rate": 0.0}))
    cfg = _cfg(env, "overfit", data=str(small), stage=2, init=str(env["root"] / "overfit1" / "model"),
               epochs=40, lr=1e-2, warmup_ratio=0.05, min_lr_ratio=0.3)
    T.train(cfg)
    rows = (Path(cfg.out) / "train_log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert losses[0] > 3.0 and np.mean(losses[-5:]) < 0.05, (losses[0], losses[-5:])
    model = load_model(cfg.out, llm=env["llm"]).eval()
    feats = torch.from_numpy(load_features(env["features"] / "s1.zarr").features)
    question = records[1]["conversations"][0]["value"]
    assert model.generate(feats, question, max_new_tokens=20) == ANSWERS[1]


def _trainable(model_dir: Path, llm: Path) -> dict[str, torch.Tensor]:
    from slidechat.checkpoint import load_model

    return _state(load_model(model_dir, llm=llm))


def test_kill_and_resume_equals_uninterrupted(env: dict[str, Path]) -> None:
    # Stage 2 with dropout in the slide encoder, accumulation and a cosine schedule: optimizer, scheduler,
    # data order and RNG must all come back for the weights to match.
    if not (env["root"] / "s1" / "model").exists():
        T.train(_cfg(env, "s1", max_steps=3))
    kw = dict(stage=2, init=str(env["root"] / "s1" / "model"), lr=2e-3, epochs=3, grad_accum=2, warmup_ratio=0.2,
              save_steps=2, save_total_limit=2)
    full = _cfg(env, "full", **kw)
    T.train(full)
    part = _cfg(env, "part", **kw, stop_after_step=3)
    T.train(part)
    assert not Path(part.out).exists()  # stopped early: no final model yet
    assert [p.name for p in T.list_checkpoints(part.work_dir)] == ["checkpoint-00000002", "checkpoint-00000003"]
    part.stop_after_step = None
    T.train(part)  # resumes from step 3
    a, b = _trainable(Path(full.out), env["llm"]), _trainable(Path(part.out), env["llm"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs after resume")
    steps = [int(r.split(",")[0]) for r in (Path(part.out) / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 7))  # 4 records x 3 epochs / 2 accumulation, each step logged once
    # A different seed really gives different weights (the comparison above can fail).
    other = _cfg(env, "other", **{**kw, "seed": 1})
    T.train(other)
    c = _trainable(Path(other.out), env["llm"])
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_stage2_does_not_resume_over_a_new_stage1_model(env: dict[str, Path], capsys) -> None:
    """Stage 1 is run again (the workflow reruns stage 2 after it): stage 2's checkpoints were trained from the
    old stage-1 weights at the same path, so they are moved aside, not resumed."""
    s1 = _cfg(env, "s1-again", max_steps=2)
    T.train(s1)
    s2 = _cfg(env, "s2-again", stage=2, init=s1.out, lr=1e-3, max_steps=3, save_steps=1, stop_after_step=1)
    T.train(s2)
    T.train(dataclasses.replace(s1, lr=5e-3, work_dir=s1.work_dir + "-2"))  # a new stage-1 model, same path
    capsys.readouterr()
    T.train(dataclasses.replace(s2, stop_after_step=None))
    out = capsys.readouterr().out
    assert "resuming" not in out and "moved to" in out


def test_other_features_do_not_resume_a_run(env: dict[str, Path], capsys) -> None:
    """The same records over another features folder (another encoder of the same width): not the same run."""
    import shutil

    other = env["root"] / "features-other"
    if not other.exists():
        shutil.copytree(env["features"], other)
    run = _cfg(env, "feat", max_steps=3, save_steps=1, stop_after_step=1)
    T.train(run)
    capsys.readouterr()
    T.train(dataclasses.replace(run, features_dir=str(other), stop_after_step=None))
    out = capsys.readouterr().out
    assert "resuming" not in out and "moved to" in out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    records = json.loads(env["data"].read_text())
    bad_x = np.full((10, DIM), 3e38, np.float32)
    # Stores refuse non-finite features; finite ones too large for the model still make the loss NaN.
    (env["root"] / "nanfeats").mkdir(exist_ok=True)
    write_h5_store(env["root"] / "nanfeats" / "bad.h5", bad_x, np.zeros((10, 2), np.int64), None, {})
    records.append({"id": "bad", "slide_id": "bad", "image": ["bad.h5"],
                    "features": str(env["root"] / "nanfeats" / "bad.h5"),
                    "conversations": records[0]["conversations"]})
    data = env["root"] / "with_nan.json"
    data.write_text(json.dumps(records))
    # A seed whose data order puts the bad record third, so that good steps (and checkpoints) come first.
    seed = next(s for s in range(100) if T.epoch_order(len(records), s, 0).index(len(records) - 1) == 2)
    bad_step = 3  # grad_accum 1: one record per step
    work = env["root"] / "nan" / "work"
    argv = ["--stage", "1", "--data", str(data), "--features-dir", str(env["features"]), "--llm", str(env["llm"]),
            "--out", str(env["root"] / "nan" / "model"), "--work-dir", str(work), "--grad-accum", "1",
            "--save-steps", "1", "--save-total-limit", "0", "--epochs", "1", "--seed", str(seed),
            "--model-config", json.dumps(MODEL)]
    rc = cli(["train", *argv])  # the dispatcher turns TrainingDiverged into one line and exit code 3
    assert rc == 3
    assert "loss is nan" in capsys.readouterr().err
    assert not (env["root"] / "nan" / "model").exists()
    names = [p.name for p in T.list_checkpoints(work)]
    assert names == [f"checkpoint-{s:08d}" for s in range(1, bad_step)]
    rows = (work / "train_log.csv").read_text().splitlines()[1:]
    assert len(rows) == bad_step - 1 and all(math.isfinite(float(r.split(",")[1])) for r in rows)


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs_parse(name: str, stage: int) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / name
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["stage"] == stage
    filled = T.deepspeed_config(str(path), T.TrainConfig(grad_accum=8, batch_size=1, grad_clip=1.0), bf16=True)
    ds = DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == stage
    assert (ds.gradient_accumulation_steps, ds.train_micro_batch_size_per_gpu, ds.train_batch_size) == (8, 1, 8)
    assert ds.gradient_clipping == 1.0 and ds.bfloat16_config.enabled


def test_launch_command() -> None:
    args = ["--stage", "2", "--data", "d.json", "--out", "m dir"]
    single = T.build_launch_command(1, 1, args, env={})
    assert single.endswith("-m slidechat.cli train --stage 2 --data d.json --out 'm dir'")
    assert "torch.distributed.run" not in single and "--deepspeed" not in single
    one_node = T.build_launch_command(8, 1, args, env={})
    torchrun = f"{shlex.quote(sys.executable)} -m torch.distributed.run"  # this interpreter's, not one on PATH
    assert one_node == (f"{torchrun} --nproc_per_node=8 --nnodes=1 --standalone -m slidechat.cli train --stage 2 "
                        "--data d.json --out 'm dir' --deepspeed configs/deepspeed/zero2.json")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NODEID": "1"}
    multi = T.build_launch_command(4, 2, args, deepspeed_config="configs/deepspeed/zero3.json", env=slurm)
    assert multi == (f'{torchrun} --nproc_per_node=4 --nnodes=2 --node_rank=$SLURM_NODEID --rdzv_backend=c10d '
                     '--rdzv_endpoint="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)":29500 '
                     '--rdzv_id=$SLURM_JOB_ID -m slidechat.cli train --stage 2 --data d.json --out \'m dir\' '
                     '--deepspeed configs/deepspeed/zero3.json')
    fixed = T.build_launch_command(2, 3, [], env={"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "2"}, master_port=6000)
    assert "--nnodes=3 --node_rank=2" in fixed and "--rdzv_endpoint=10.0.0.1:6000" in fixed
    with pytest.raises(T.TrainSetupError, match="SLURM"):
        T.build_launch_command(2, 2, args, env={})
    # --print-launch prints the same command for the run's own flags.
    assert T.build_launch_command(2, 1, ["--stage", "1", "--deepspeed", "x.json"], env={}).count("--deepspeed") == 1


def test_yaml_defaults_and_cli_overrides(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    s1 = T.load_yaml_config(root / "train_stage1.yaml")
    s2 = T.load_yaml_config(root / "train_stage2.yaml")
    assert (s1["lr"], s1["max_length"], s1["batch_size"], s1["grad_accum"]) == (1e-3, 51200, 1, 8)
    assert (s2["lr"], s2["max_length"], s2["grad_clip"], s2["grad_accum"]) == (2e-5, 19600, 1.0, 8)
    cfg, _ = T.config_from_args(["--config", str(root / "train_stage2.yaml"), "--lr", "0.5", "--context", "per_patch",
                                 "--encoder-layers", "1", "--model-config", '{"encoder_heads": 4}'])
    assert cfg.lr == 0.5 and cfg.grad_accum == 8
    assert cfg.model == {"context": "per_patch", "encoder_layers": 1, "encoder_heads": 4}
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 1\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        T.load_yaml_config(bad)


def test_training_data_that_is_not_a_list_of_records_is_a_clear_error(env: dict[str, Path], tmp_path: Path) -> None:
    for text, why in (('{"id": "r0"}', "expected a list of records"), ("[{", "not valid JSON")):
        data = tmp_path / "data.json"
        data.write_text(text)
        with pytest.raises(InputError, match=f"{data}.*{why}"):
            T.train(_cfg(env, "notlist", data=str(data)))
    # found at the record's step, maybe hours in: the error names the record
    no_talk = json.loads(env["data"].read_text())
    no_talk[1] = {"id": "no-talk", "slide_id": "s1", "image": ["s1.zarr"]}
    other_role = json.loads(env["data"].read_text())
    other_role[2]["conversations"].insert(0, {"from": "system", "value": "You are a pathologist."})
    for record, records in (("no-talk", no_talk), ("r2", other_role)):
        data.write_text(json.dumps(records))
        with pytest.raises(ValueError, match=f"training record '{record}'"):
            T.train(_cfg(env, f"bad-{record}", data=str(data)))


def test_lr_schedule_is_warmup_then_cosine_to_the_floor() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = T.lr_schedule(opt, 100, warmup_ratio=0.1, min_lr_ratio=0.2)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 10 warm-up steps from 0 (as xtuner's LinearLR from ~0), peak at step 10, cosine down to 0.2 x lr
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1.0) and lrs[10] == pytest.approx(2.0)
    assert lrs[55] == pytest.approx(0.4 + 1.6 * 0.5, abs=0.05) and lrs[99] == pytest.approx(0.4, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_4bit_is_gpu_only(env: dict[str, Path]) -> None:
    with pytest.raises(T.TrainSetupError, match="CUDA GPU"):
        _cfg(env, "q", load_in_4bit=True).resolved()
    with pytest.raises(InputError, match="--llm"):
        _cfg(env, "q", llm=str(env["root"] / "nope")).resolved()


def test_cli_run_with_curves(env: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    curves = env["root"] / "cli" / "curves" / "stage1.png"
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "train_stage1.yaml"),
            "--stage", "1", "--data", str(env["data"]), "--features-dir", str(env["features"]),
            "--llm", str(env["llm"]), "--out", str(env["root"] / "cli" / "model"),
            "--work-dir", str(env["root"] / "cli" / "work"), "--max-steps", "2", "--grad-accum", "2",
            "--max-patches", "10", "--curves", str(curves), "--model-config", json.dumps(MODEL)]
    rc = T.main(argv)
    assert rc == 0 and curves.stat().st_size > 1000
    # a progress line per step in the log (not a terminal), and the model card beside the model
    err = capsys.readouterr().err
    assert "stage 1: step 1/2 (50%), loss " in err and "tokens/s" in err and "ETA" in err
    assert "stage 1: step 2/2 (100%)" in err and "done in" in err
    card = json.loads((env["root"] / "cli" / "model" / "model_card.json").read_text())
    assert card["stage"] == 1 and card["optimizer_steps"] == 2 and card["trained_on"]["records"] == 4
    assert card["synthetic_demo"] is False and card["base_llm"] == str(env["llm"])
    # how the training stores were made, so evaluation can refuse features made otherwise
    store_attrs = read_store_attrs(next(p for p in env["features"].iterdir() if p.suffix in (".zarr", ".h5")))
    assert card["features"] == {k: store_attrs.get(k) for k in PROVENANCE_KEYS} and card["features"]["encoder"]
    assert "stage 1" in (env["root"] / "cli" / "model" / "MODEL_CARD.md").read_text()
    meta = json.loads((env["root"] / "cli" / "model" / "slidechat_config.json").read_text())
    assert meta["config"]["max_patches_train"] == 10 and meta["llm_format"] == "base"
    saved = json.loads((env["root"] / "cli" / "model" / "training_config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["max_length"] == 51200 and not math.isnan(saved["warmup_ratio"])
    # The same command again resumes (nothing left to do); other settings do not resume foreign checkpoints.
    capsys.readouterr()
    assert T.main(argv) == 0 and "resuming from" in capsys.readouterr().out
    assert T.main(argv + ["--lr", "0.002"]) == 0
    assert "starting from step 0" in capsys.readouterr().out
    (run,) = (env["root"] / "cli" / "work" / "stale").iterdir()  # one folder per run moved aside
    assert [p.name for p in run.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-00000002"]


def test_runs_moved_aside_by_other_settings_are_all_kept(env: dict[str, Path], capsys) -> None:
    """Three settings in turn in one work dir: the checkpoints (and log) of both earlier runs stay in stale/,
    none is deleted to make room for the next."""
    work = env["root"] / "aside" / "work"
    for lr in (1e-2, 5e-3, 2e-3):
        T.train(_cfg(env, "aside", lr=lr, stop_after_step=1, save_steps=1))
    runs = sorted((work / "stale").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert [p.name for p in T.list_checkpoints(run)] == ["checkpoint-00000001"]
        assert (run / "train_log.csv").read_text().count("\n") == 2  # header + step 1
    lrs = sorted(json.loads((run / "checkpoint-00000001" / "trainer_state.json").read_text())["config"]["lr"]
                 for run in runs)
    assert lrs == [5e-3, 1e-2]
    assert [p.name for p in T.list_checkpoints(work)] == ["checkpoint-00000001"]


def test_srun_tasks_become_ranks_with_slurm_rendezvous():
    from slidechat.train import first_slurm_host, slurm_rank_env

    assert first_slurm_host("gpu[03-05,09],cpu01") == "gpu03"
    assert first_slurm_host("node7") == "node7"
    env = {"SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "123456"}
    assert slurm_rank_env(env) == {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16",
                                   "MASTER_ADDR": "gpu12", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert slurm_rank_env({**env, "RANK": "0"}) == {}  # a launcher already set the ranks
    assert slurm_rank_env({**env, "SLURM_NTASKS": "1"}) == {}  # a single task is no distributed run


def test_every_rank_gets_the_same_number_of_micro_batches() -> None:
    for n, world in ((7, 2), (1, 4), (9, 3), (10, 4)):
        shares = [T.micro_batches(n, 1, 5, 2, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # every rank the same number of micro-batches
        seen = {b[0] for s in shares for b in s}
        assert seen == set(range(n))  # and every record is seen
    assert [len(s) for s in T.optimizer_steps([[i] for i in range(7)], 3)] == [3, 3, 1]
    assert len(T.optimizer_steps([[i] for i in range(7)], 3, max_steps=2)) == 2


@pytest.fixture(scope="module")
def bf16_llm(env: dict[str, Path]) -> Path:
    """The tiny LLM saved in bf16, as Qwen2.5 is (transformers 5 loads it in bf16 by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = env["root"] / "llm_bf16"
    if not out.exists():
        AutoModelForCausalLM.from_pretrained(env["llm"]).to(torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(env["llm"]).save_pretrained(out)
    return out


def test_fp32_master_weights_keep_small_updates(env: dict[str, Path], bf16_llm: Path) -> None:
    s1 = env["root"] / "s1_bf16" / "model"
    if not s1.exists():
        T.train(_cfg(env, "s1_bf16", llm=str(bf16_llm), max_steps=1))
    # stage 2 with bf16 on: what is trained is fp32 (computed under bf16 autocast), frozen weights stay bf16
    run = T.setup(_cfg(env, "fp32", stage=2, init=str(s1), llm=str(bf16_llm), lr=2e-5, max_steps=3, bf16=True))
    dtypes = {n: p.dtype for n, p in run.model.named_parameters()}
    assert set(dtypes.values()) == {torch.float32} and run.bf16
    before = {n: p.detach().clone() for n, p in run.model.llm.named_parameters()}
    assert T.run_steps(run, 0)
    changed = [bool((p.detach() != before[n]).any()) for n, p in run.model.llm.named_parameters()]
    assert all(changed)  # in bf16 AdamW at 2e-5 rounds away most of these updates
    # stage 1: the frozen LLM stays bf16 with bf16 on (fp32 with --no-bf16); slide encoder + projector fp32
    for bf16, llm_dtype in ((True, torch.bfloat16), (False, torch.float32)):
        model = T.build_model(_cfg(env, "s1dt", llm=str(bf16_llm)).resolved())
        assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16  # as loaded ("auto")
        T.set_parameter_dtypes(model, bf16)
        assert {p.dtype for n, p in model.named_parameters() if n.startswith("llm.")} == {llm_dtype}
        assert {p.dtype for n, p in model.named_parameters() if not n.startswith("llm.")} == {torch.float32}
    # under DeepSpeed the engine keeps the LLM's fp32 masters: load it in bf16 (host memory), visual in fp32
    model = T.build_model(_cfg(env, "s2dt", stage=2, init=str(s1), llm=str(bf16_llm)).resolved())
    T.set_parameter_dtypes(model, True, deepspeed=True)
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.projector.model[0].weight.dtype == torch.float32


def test_bf16_weights_alone_lose_small_updates() -> None:
    """Why the masters are fp32: the same AdamW step on a bf16 copy leaves most weights unchanged."""
    torch.manual_seed(0)
    w = torch.randn(4096)
    grads = torch.randn(4096)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(w.clone().to(dtype))
        opt = torch.optim.AdamW([p], lr=2e-5, weight_decay=0.0)
        p.grad = grads.to(dtype)
        opt.step()
        moved[dtype] = float((p.detach().float() != w.to(dtype).float()).float().mean())
    assert moved[torch.float32] == 1.0 and moved[torch.bfloat16] < 0.5


def test_cuda_device_follows_gpu_binding() -> None:
    assert T.cuda_device_index(3, 8) == 3  # torchrun: every rank sees the node's GPUs
    assert T.cuda_device_index(3, 1) == 0  # srun binding one GPU per task: LOCAL_RANK 3 sees it as cuda:0
    with pytest.raises(T.TrainSetupError, match="LOCAL_RANK is 5 but this process sees 2 GPUs"):
        T.cuda_device_index(5, 2)


def test_4bit_settings_and_missing_bitsandbytes(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    q = T.quantization_config()
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    # without the optional extra: one clear line saying how to install it (checked before any CUDA work)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = _cfg(env, "q", load_in_4bit=True)
    with pytest.raises(T.TrainSetupError, match=r"pip install -c constraints.txt '\.\[quant\]'"):
        T._load_4bit_model(cfg, None)
