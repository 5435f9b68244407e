"""Two-stage SlideChat training: a plain PyTorch loop for one process, DeepSpeed ZeRO under a launcher.

Stage 1 (cross-domain alignment): the LLM is frozen, the slide encoder and projector learn from captions.
Stage 2 (visual instruction learning): starts from stage 1 (`--model`); slide encoder, projector and LLM are
all trained (or LoRA adapters on the LLM with `--lora`).

Checkpoints (trainable weights, optimizer, scheduler, data position, RNG states) go to `--work-dir`, which
lies outside the rule's declared output; a rerun resumes from the newest one. The declared output `--out` is
the final model directory, written atomically with `checkpoint.save_model`, together with the training
log (`train_log.csv`) and curves (`training_curves.png`). TensorBoard events are in `<work-dir>/tensorboard`.

What is trained is kept in fp32 and computed in bf16 under autocast (`set_parameter_dtypes`); the loss
takes logits of the labelled positions only. One optimizer step is one accumulation window of the loop
(`run_steps`), in one process and under DeepSpeed alike; every rank runs the same number of steps.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from wsicore.cli import command_parser
from wsicore.files import atomic_path, check_replaceable, input_file, jsonable, output_folder, read_json, write_json
from wsicore.progress import Progress
from wsicore.settings import add_arguments, from_arguments, setting
from wsicore.errors import EXIT_DIVERGED, ConfigError, InputError, UsageError, UserError
from wsicore.torchfile import read_torch_file

# Issue defaults; configs/train_stage{1,2}.yaml hold the same values.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"lr": 1e-3, "max_length": 51200, "epochs": 3, "grad_clip": 1.0},
    2: {"lr": 2e-5, "max_length": 19600, "epochs": 1, "grad_clip": 1.0},
}
LOG_COLUMNS = ["step", "loss", "lr", "tokens_per_s", "patches_per_s", "grad_norm"]
CKPT_PREFIX = "checkpoint-"


class TrainingDiverged(UserError, RuntimeError):
    """Loss became NaN or inf; the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class TrainSetupError(UserError, RuntimeError):
    """A setting, input or environment that prevents training (message names the option)."""


@dataclass
class TrainConfig:
    """One training stage (config sections `train.stage1` / `train.stage2`); YAML keys and flags use the same names."""

    # Set by the workflow rule (paths, launcher, resources) rather than by a config key of the stage.
    stage: int = setting(1, choices=[1, 2], config=False, help="1: captions, LLM frozen; 2: instructions, all trained")
    data: str = setting("", config=False, help="training JSON from build-instructions")
    out: str = setting("", config=False, help="final model directory (declared output)")
    work_dir: str = setting("", config=False, help="checkpoints and logs (outside the declared outputs)")
    features_dir: str | None = setting(None, config=False, help="folder of the feature stores")
    llm: str | None = setting(None, config=False, help="local Hugging Face LLM directory")
    init: str | None = setting(None, config=False, flag="--model", aliases=("--init",),
                               help="the model directory to start from (stage 2: the stage-1 model)")
    # The schedule; None = the stage's default (STAGE_DEFAULTS).
    lr: float | None = setting(None, minimum=0, help="peak learning rate; null = 1e-3 (stage 1), 2e-5 (stage 2)")
    epochs: int | None = setting(None, minimum=1, help="passes over the data; null = 3 (stage 1), 1 (stage 2)")
    max_steps: int | None = setting(None, minimum=1, help="cap on optimizer steps (after epochs are laid out)")
    batch_size: int = setting(1, minimum=1, help="records per micro-batch and device")
    grad_accum: int = setting(8, minimum=1, help="micro-batches per optimizer step")
    max_length: int | None = setting(
        None, minimum=16, help="token cap per record; null = 51200 (stage 1), 19600 (stage 2)")
    max_patches: int | None = setting(None, minimum=1, help="patch cap per slide; null = the model's max_patches_train")
    warmup_ratio: float = setting(0.03, minimum=0, maximum=1, help="share of the steps spent warming up")
    min_lr_ratio: float = setting(0.0, minimum=0, maximum=1, help="final learning rate over the peak (cosine)")
    weight_decay: float = setting(0.0, minimum=0, help="AdamW weight decay")
    betas: tuple[float, float] = setting((0.9, 0.999), help="AdamW betas")
    grad_clip: float | None = setting(None, exclusive_minimum=0, help="gradient norm clip; null = 1.0")
    seed: int = setting(0, help="seed of data order and initialisation")
    save_steps: int = setting(500, minimum=1, help="optimizer steps between checkpoints")
    save_total_limit: int = setting(2, minimum=0, help="checkpoints kept (0: all)")
    log_steps: int = setting(1, minimum=1, help="optimizer steps between log lines")
    stop_after_step: int | None = setting(
        None, config=False, help="save a checkpoint after this step and exit (tests a kill + resume)")
    lora: bool = setting(False, help="stage 2: LoRA adapters on the LLM instead of training all of it")
    lora_r: int = setting(64, minimum=1, help="LoRA rank")
    lora_alpha: int = setting(16, minimum=1, help="LoRA alpha")
    lora_dropout: float = setting(0.05, minimum=0, maximum=1, help="LoRA dropout")
    load_in_4bit: bool = setting(False, help="stage 1: frozen LLM in bitsandbytes NF4 (GPU only)")
    bf16: bool | None = setting(
        None, help="bf16 autocast over fp32 master weights (frozen weights stored in bf16); null = on when CUDA "
                   "is available")
    gradient_checkpointing: bool | None = setting(None, help="recompute activations; null = on when CUDA is available")
    deepspeed: str | None = setting(
        None, config=False, help="DeepSpeed JSON (configs/deepspeed/zero2.json); needs a deepspeed/torchrun launch")
    num_workers: int = setting(0, minimum=0, help="data loader processes")
    threads: int | None = setting(
        None, minimum=1, config=False, help="torch CPU threads (default: torch's); 1 is fastest for tiny models")
    curves: str | None = setting(None, config=False, help="also write the loss/lr PNG to this path")
    gpus_per_node: int = setting(
        0, minimum=0, config=False, help="GPUs per node; > 1 starts torchrun with --deepspeed (nodes from SLURM_NNODES)")
    # SlideChatConfig fields for a new model (stage 1): the config section `model`, passed as --model-config JSON
    model: dict[str, Any] = field(default_factory=dict, metadata={"config": False, "cli": False})

    def resolved(self) -> "TrainConfig":
        """Fill stage defaults and check what is required, naming the option at fault."""
        c = dataclasses.replace(self)
        if c.stage not in (1, 2):
            raise UsageError(f"--stage must be 1 or 2, got {c.stage}")
        for k, v in STAGE_DEFAULTS[c.stage].items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        for name in ("data", "out", "work_dir"):
            if not getattr(c, name):
                raise UsageError(f"--{name.replace('_', '-')} is required")
        input_file(c.data, "training JSON (from `slidechat build-instructions`)", "--data")
        if c.stage == 1 and not c.llm and not c.init:
            raise UsageError("stage 1 needs --llm (a local Hugging Face LLM directory)")
        if c.stage == 2 and not c.init:
            raise UsageError("stage 2 needs --model (the stage-1 model directory)")
        for name, flag in (("llm", "--llm"), ("init", "--model"), ("features_dir", "--features-dir"),
                           ("deepspeed", "--deepspeed")):
            p = getattr(c, name)
            if p and not Path(p).exists():
                raise InputError(f"{p} not found (option {flag})")
        if c.load_in_4bit:
            if c.stage != 1:
                raise UsageError("--load-in-4bit is for stage 1, where the LLM is frozen")
            if not torch.cuda.is_available():
                raise TrainSetupError("--load-in-4bit (bitsandbytes NF4) needs a CUDA GPU; this machine has none")
        c.betas = tuple(c.betas)  # type: ignore[assignment]
        from slidechat.checkpoint import CONFIG_FILE

        check_replaceable(c.out, CONFIG_FILE)  # before hours of training, not when the model is written
        return c


# ----------------------------------------------------------------------------------------------------- data


class InstructionDataset(torch.utils.data.Dataset):
    """Records from `slidechat build-instructions`; features are read lazily from the stores per item.

    Every patch of a slide is returned: the patch cap is the model's (`SlideChat.encode_slide`), the one
    place it is applied.
    """

    def __init__(self, records: list[dict], tokenizer: Any, features_dir: str | None = None,
                 max_length: int | None = None, cache_bytes: int = 1 << 30, feature_dim: int | None = None) -> None:
        self.records = records
        self.feature_dim = feature_dim  # the model's: a store of another width is refused, naming the slide
        self.tokenizer = tokenizer
        self.features_dir = Path(features_dir) if features_dir else None
        self.max_length = max_length
        self.feature_dim = feature_dim  # the model's: a store of another width is refused, naming it
        self._index: Any = None  # preprocessing.stores.FeatureStoreIndex, built on first use
        # Records repeat slides (many questions per slide): keep the last slides' features in memory, up to
        # cache_bytes (a 40k-patch slide of 512-d features is 80 MB).
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[Path, torch.Tensor] = OrderedDict()

    @staticmethod
    def read_records(path: str | os.PathLike) -> list[dict]:
        """The records of a training JSON; one that is not a non-empty list of records is refused, naming it."""
        what = "training JSON (from `slidechat build-instructions`)"
        records = read_json(path, what, "--data")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise InputError(f"{path}: not a {what}: expected a list of records (option --data)")
        if not records:
            raise InputError(f"{path} holds no training records (option --data)")
        return records

    def __len__(self) -> int:
        return len(self.records)

    def store_path(self, rec: dict) -> Path:
        """The record's store: by slide id in --features-dir when given (stores may have moved), else its path;
        found by the `FeatureStoreIndex` that build-instructions and evaluation use."""
        from preprocessing.stores import FeatureStoreIndex, StoreError, normalize_slide_id

        sid = rec.get("slide_id") or normalize_slide_id(rec["image"][0])
        if self.features_dir is not None:
            if self._index is None:
                self._index = FeatureStoreIndex(self.features_dir)
            found = self._index.find(sid)
            if found is not None:
                return found
        if rec.get("features") and Path(rec["features"]).exists():
            return Path(rec["features"])
        raise StoreError(f"no feature store for slide {sid!r} (record {rec.get('id')}) in "
                         f"{self.features_dir or 'the record'}; run build-instructions against --features-dir")

    def load_features(self, rec: dict) -> torch.Tensor:
        from preprocessing.stores import StoreError, load_features
        from slidechat.evaluate import check_feature_width

        path = self.store_path(rec)
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        fs = load_features(path)
        if len(fs) == 0:
            raise StoreError(f"{path}: no patches (a slide without tissue) (record {rec.get('id')}); build the "
                             "training JSON with `slidechat build-instructions`, which skips empty stores")
        check_feature_width(path, fs.features, fs.attrs, self.feature_dim)
        x = torch.from_numpy(np.ascontiguousarray(fs.features, np.float32))
        self._cache[path] = x
        while len(self._cache) > 1 and sum(t.nbytes for t in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return x

    def __getitem__(self, i: int) -> dict[str, Any]:
        from slidechat.template import IGNORE_INDEX, tokenize_conversation

        rec = self.records[i]
        try:
            tok = tokenize_conversation(self.tokenizer, rec["conversations"], max_length=self.max_length)
        except (KeyError, TypeError, ValueError) as e:  # found at its step, maybe hours in: say which record
            raise ValueError(f"training record {rec.get('id')!r} (#{i}): {type(e).__name__}: {e}; fix or drop it "
                             "(or raise --max-length) and rerun to resume") from e
        if all(label == IGNORE_INDEX for label in tok["labels"]):
            _note(f"record {rec.get('id')}: --max-length {self.max_length} cuts off all of its replies; it adds "
                  "nothing to the loss (raise --max-length or shorten the record)")
        return {"features": self.load_features(rec), "input_ids": torch.tensor(tok["input_ids"], dtype=torch.long),
                "labels": torch.tensor(tok["labels"], dtype=torch.long), "id": rec.get("id")}


def collate(batch: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Right-pad input_ids (pad id) and labels (-100); features stay a list (one variable-length slide each)."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = b["input_ids"], b["labels"], 1
    return {"features": [b["features"] for b in batch], "input_ids": ids, "attention_mask": mask, "labels": labels,
            "ids": [b.get("id") for b in batch]}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends only on (seed, epoch), so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def epoch_padding(n_records: int, batch_size: int, world: int) -> int:
    """Micro-batches repeated at the end of every epoch so that it splits evenly over `world` ranks."""
    return -math.ceil(n_records / batch_size) % world


def micro_batches(n_records: int, batch_size: int, seed: int, epochs: int, rank: int = 0,
                  world: int = 1) -> list[list[int]]:
    """This rank's micro-batches of the run, epoch after epoch; each rank takes every world-th batch.

    When an epoch's batches do not split evenly over the ranks, its first batches are dealt again at
    its end (as torch's DistributedSampler pads), so that every rank runs the same number of steps:
    a rank with fewer would leave the others waiting in a collective until the timeout.
    """
    out = []
    for e in range(epochs):
        order = epoch_order(n_records, seed, e)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        batches += [batches[i % len(batches)] for i in range(epoch_padding(n_records, batch_size, world))]
        out.extend(batches[rank::world])
    return out


def optimizer_steps(batches: list[list[int]], grad_accum: int, max_steps: int | None = None) -> list[list[list[int]]]:
    """Micro-batches grouped per optimizer step (the last group may be shorter), at most `max_steps` groups."""
    steps = [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]
    return steps if max_steps is None else steps[:max_steps]


# ---------------------------------------------------------------------------------------------------- model


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named parameters of the three parts: `slide_encoder` (LongNet), `projector` and `llm`."""
    prefixes = {"slide_encoder": "LongNet_encoder.", "projector": "projector.", "llm": "llm."}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {k: [] for k in prefixes}
    for name, p in model.named_parameters():
        for group, prefix in prefixes.items():
            if name.startswith(prefix):
                groups[group].append((name, p))
                break
        else:
            raise ValueError(f"parameter {name} belongs to no known part of SlideChat")
    return groups


def quantization_config() -> Any:
    """Stage 1's frozen LLM in 4 bits, as the original: bitsandbytes NF4 with double quantisation, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _load_4bit_model(cfg: TrainConfig, mcfg: Any) -> nn.Module:
    """Stage 1 with the frozen LLM in bitsandbytes NF4 (as the original), new encoder + projector in fp32."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise TrainSetupError("--load-in-4bit needs bitsandbytes, an optional extra for GPU machines: "
                              "pip install -c constraints.txt '.[quant]'") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slidechat.model import SlideChat

    llm = AutoModelForCausalLM.from_pretrained(cfg.llm, quantization_config=quantization_config(),
                                               local_files_only=True, dtype=torch.bfloat16,
                                               use_safetensors=True)  # transformers never unpickles weights
    return SlideChat(llm, AutoTokenizer.from_pretrained(cfg.llm, local_files_only=True), mcfg, llm_source=str(cfg.llm))


def build_model(cfg: TrainConfig) -> nn.Module:
    """Stage 1: a new slide encoder + projector on the local LLM, LLM frozen. Stage 2: stage-1 model, all trainable."""
    from slidechat.checkpoint import load_model, new_model
    from slidechat.model import SlideChatConfig

    if cfg.stage == 1 and not cfg.init:
        model_kw = dict(cfg.model)
        if cfg.max_patches is not None:
            model_kw["max_patches_train"] = cfg.max_patches
        try:
            mcfg = SlideChatConfig(**model_kw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model settings (config section `model`, option --model-config): {exc}") from exc
        model = _load_4bit_model(cfg, mcfg) if cfg.load_in_4bit else new_model(cfg.llm, mcfg)
    else:
        model = load_model(cfg.init, llm=cfg.llm)
        for k, v in cfg.model.items():  # the architecture comes from --model; only say when flags disagree
            if k in ("context", "bypass_slide_encoder") and getattr(model.config, k) != v:
                _note(f"{k}={getattr(model.config, k)!r} from {cfg.init} kept (flag asked {v!r})")
        if cfg.max_patches is not None:
            model.config.max_patches_train = cfg.max_patches
    for name, p in model.named_parameters():
        p.requires_grad_(not (cfg.stage == 1 and name.startswith("llm.")) and p.is_floating_point())
    if cfg.stage == 2 and cfg.lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model.llm = get_peft_model(model.llm, lcfg)  # freezes the base LLM, adapters trainable (in fp32)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model.llm, "config", None) is not None:
            model.llm.config.use_cache = False
    return model


def set_parameter_dtypes(model: nn.Module, bf16: bool, deepspeed: bool = False) -> None:
    """Master weights in fp32: what is trained is kept in fp32 and computed in bf16 under autocast.

    transformers loads Qwen2.5 in bf16 (`dtype="auto"`), where AdamW at lr 2e-5 rounds most updates
    away. So trained parameters become fp32 (exact: bf16 -> fp32 loses nothing); frozen LLM
    weights stay bf16 when bf16 is on (they never change; autocast computes in bf16 anyway), fp32
    when it is off. Under DeepSpeed the engine holds the fp32 masters of the LLM itself, which is
    then loaded in bf16 to save host memory; the slide encoder and projector are always fp32
    (`train` hands their fp32 values to DeepSpeed's masters). 4-bit weights are left alone.
    """
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        fp32 = not bf16 or not name.startswith("llm.") or (p.requires_grad and not deepspeed)
        dtype = torch.float32 if fp32 else torch.bfloat16
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Any:
    """Linear warm-up over ceil(warmup_ratio x steps), then cosine down to min_lr_ratio x lr (transformers')."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps,
                                                       min_lr_rate=min_lr_ratio)


# ------------------------------------------------------------------------------------------------ checkpoints


def list_checkpoints(work_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in work_dir, oldest first (temporary dirs of an interrupted save are ignored)."""
    root = Path(work_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(CKPT_PREFIX + r"\d+", p.name)
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def _rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tuples, numbers and tensors: readable weights-only."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], source: Path) -> None:
    try:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise TrainSetupError(f"{source}: not a random-generator state written by this version ({e}); remove the "
                              "work dir to start over") from e
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(work_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest beyond `keep` (never the new one)."""
    final = work_dir / f"{CKPT_PREFIX}{step:08d}"
    with atomic_path(final, is_dir=True, replaces="trainer_state.json") as tmp:
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / "optim.pt")
        write_json(tmp / "trainer_state.json", {**state, "step": step})
    if keep > 0:
        for old in list_checkpoints(work_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Resume model, optimizer, scheduler and RNG from checkpoint-<step>; every file read as data only."""
    weights = read_torch_file(path / "trainable.pt", stubs=False)
    if not isinstance(weights, dict):
        raise TrainSetupError(f"{path / 'trainable.pt'}: not a dict of parameters (damaged); remove {path} to resume "
                              "from the checkpoint before it, or the work dir to start over")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [str(n) for n in weights if n not in params]
    if missing or unknown:
        raise TrainSetupError(f"checkpoint {path} does not hold this model's trainable parameters (missing e.g. "
                              f"{missing[:3]}, unknown e.g. {unknown[:3]}); was it written by a run with other "
                              "settings? Remove the work dir to start over.")
    # copy_ would broadcast a tensor of another shape and cast another dtype: refuse what does not fit exactly
    bad = [n for n, t in weights.items() if not isinstance(t, torch.Tensor) or t.shape != params[n].shape
           or not t.is_floating_point() or not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainSetupError(f"{path / 'trainable.pt'}: parameter(s) {bad[:5]} are not finite floating-point tensors "
                              f"of the model's shapes (damaged); remove {path} to resume from the checkpoint before "
                              "it, or the work dir to start over")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    other = read_torch_file(path / "optim.pt", stubs=False)
    try:
        optimizer.load_state_dict(other["optimizer"])
        scheduler.load_state_dict(other["scheduler"])
        rng = other["rng"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainSetupError(f"{path / 'optim.pt'}: not the optimizer state of this run ({type(e).__name__}: {e}); "
                              f"remove {path} to resume from the checkpoint before it, or the work dir to start "
                              "over") from e
    _set_rng_state(rng, path / "optim.pt")
    return json.loads((path / "trainer_state.json").read_text())


def _deepspeed_globals() -> dict[str, Any]:
    """The DeepSpeed records its ZeRO optimizer files pickle, and what to build each with when reading them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def zero_stage(value: int) -> ZeroStageEnum:
        # An enum member is a process-wide singleton: returned by a function, BUILD can never reach it.
        return ZeroStageEnum(int(value))

    classes = (LossScaler, DynamicLossScaler, fragment_address)  # plain classes: every instance a fresh object
    return {**{f"{c.__module__}.{c.__qualname__}": c for c in classes},
            f"{ZeroStageEnum.__module__}.{ZeroStageEnum.__qualname__}": zero_stage}


def load_deepspeed_checkpoint(engine: Any, path: Path, rank: int) -> dict:
    """Resume a DeepSpeed engine from checkpoint-<step> (`path`), reading every file as data only.

    DeepSpeed's own checkpoint engine unpickles with `weights_only=False`; the engine is given one whose
    `load` is `read_torch_file` (tensors, plain data and the few DeepSpeed records in `_deepspeed_globals`).
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if engine.load_universal_checkpoint():  # those files are unpickled by DeepSpeed's optimizer itself
        raise TrainSetupError(f"{path}: DeepSpeed universal checkpoints are not resumed (DeepSpeed would unpickle "
                              "them unrestricted); remove `checkpoint.load_universal` from the DeepSpeed config")
    trusted = _deepspeed_globals()

    class DataOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return read_torch_file(path, stubs=False, trusted=trusted)

    saving_engine = engine.checkpoint_engine
    engine.checkpoint_engine = DataOnlyCheckpointEngine()
    try:
        _, state = engine.load_checkpoint(str(path.parent), tag=path.name)
    finally:
        engine.checkpoint_engine = saving_engine
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(read_torch_file(rng_file, stubs=False), rng_file)
    return state or json.loads((path / "trainer_state.json").read_text())


# ------------------------------------------------------------------------------------------------------- logs


class TrainLog:
    """Per-step metrics to CSV (kept across resumes, cut back to the resumed step) and TensorBoard."""

    def __init__(self, work_dir: Path, start_step: int, enabled: bool = True) -> None:
        self.csv_path = work_dir / "train_log.csv"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        rows = []
        if self.csv_path.exists() and start_step > 0:
            with open(self.csv_path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start_step]
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(work_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="") as fh:  # appended line by line: a killed run keeps its log
            csv.DictWriter(fh, fieldnames=LOG_COLUMNS).writerow(row)
        for k, v in row.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------------- loop


def _dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _note(message: str) -> None:
    """A note for the user, printed by rank 0 only (not once per rank)."""
    if _dist_info()[0] == 0:
        print(f"note: {message}", flush=True)


def cuda_device_index(local_rank: int, visible: int) -> int:
    """This rank's GPU among the `visible` ones: LOCAL_RANK where the process sees the node's GPUs
    (torchrun), 0 where it sees exactly one (srun binding one GPU per task)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise TrainSetupError(f"LOCAL_RANK is {local_rank} but this process sees {visible} GPUs "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); give each rank "
                          "either one GPU or all of its node's")


def deepspeed_config(path: str, cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    """Our DeepSpeed JSON with its "auto" values filled from the training config."""
    ds = json.loads(Path(path).read_text())
    fill = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip or 0.0}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    for key, on in (("bf16", bf16), ("fp16", False)):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = on
    # The loop owns the accumulation window (`engine.step()` after its last micro-batch), so that a
    # short last window is an optimizer step as in one process, not gradients DeepSpeed drops.
    ds["managed_gradient_accumulation"] = False
    return ds


@dataclass
class Run:
    """A prepared training run: what `setup` builds and `resume` and `run_steps` use."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: Any
    scheduler: Any
    engine: Any  # the DeepSpeed engine, None in one process
    data: InstructionDataset
    steps: list[list[list[int]]]  # this rank's micro-batches (record indices), grouped per optimizer step
    rank: int
    world: int
    device: torch.device
    bf16: bool
    fingerprint: str
    pad_id: int

    @property
    def work_dir(self) -> Path:
        return Path(self.cfg.work_dir)

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) one training stage; returns the final model directory `cfg.out`."""
    run = setup(cfg)
    start_step = resume(run)
    if run_steps(run, start_step):
        write_final(run)
    return Path(run.cfg.out)


def setup(cfg: TrainConfig) -> Run:
    """Model, data, optimizer and schedule of a run (under DeepSpeed when `cfg.deepspeed` is set)."""
    cfg = cfg.resolved()
    cuda = torch.cuda.is_available()
    bf16 = cuda if cfg.bf16 is None else cfg.bf16
    if cfg.gradient_checkpointing is None:
        cfg.gradient_checkpointing = cuda
    rank, world, local_rank = _dist_info()
    use_ds = cfg.deepspeed is not None
    if world > 1 and not use_ds:
        raise TrainSetupError("launched with several processes but without --deepspeed CONFIG "
                              "(multi-GPU training runs under DeepSpeed ZeRO; see configs/deepspeed/)")
    device = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count())) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    output_folder(cfg.work_dir, "--work-dir")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    records = InstructionDataset.read_records(cfg.data)  # a bad file fails before the (slow) model load
    model = build_model(cfg)
    set_parameter_dtypes(model, bf16, deepspeed=use_ds)
    if cfg.max_patches is None:
        cfg.max_patches = model.config.max_patches_train
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    data = InstructionDataset(records, tokenizer, features_dir=cfg.features_dir, max_length=cfg.max_length,
                              feature_dim=model.config.feature_dim)
    pad = epoch_padding(len(data), cfg.batch_size, world)
    if pad:
        _note(f"{math.ceil(len(data) / cfg.batch_size)} micro-batches per epoch do not split evenly over {world} "
              f"ranks: each epoch's first {pad} are repeated at its end, so that every rank runs the same steps")
    steps = optimizer_steps(micro_batches(len(data), cfg.batch_size, cfg.seed, cfg.epochs, rank, world),
                            cfg.grad_accum, cfg.max_steps)

    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(optimizer, len(steps), cfg.warmup_ratio, cfg.min_lr_ratio)
    engine = None
    if use_ds:
        engine, optimizer, scheduler = _deepspeed_engine(model, optimizer, scheduler, cfg, bf16)
    return Run(cfg, model, optimizer, scheduler, engine, data, steps, rank, world, device, bf16 and engine is None,
               run_fingerprint(cfg), pad_id)


def _deepspeed_engine(model: nn.Module, optimizer: Any, scheduler: Any, cfg: TrainConfig, bf16: bool) -> tuple:
    """DeepSpeed engine, optimizer and scheduler around our model, optimizer and schedule."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    from slidechat.longnet import DilatedAttention

    deepspeed.init_distributed()
    # DeepSpeed casts the module to bf16 and builds its fp32 masters from that copy: keep the slide
    # encoder's and projector's fp32 values (a stage-1 result) to put back into the masters.
    visual = {n: p.detach().clone() for n, p in model.named_parameters()
              if p.requires_grad and not n.startswith("llm.")}
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg.deepspeed, cfg, bf16))
    if engine.zero_optimization_stage() == 3:
        # the attention reads its q/k/v weights as one fused GEMM, outside the projections' own forward:
        # ZeRO-3 must gather them for the attention module
        for m in model.modules():
            if isinstance(m, DilatedAttention):
                for proj in (m.q_proj, m.k_proj, m.v_proj):
                    for p in proj.parameters():
                        deepspeed.zero.register_external_parameter(m, p)
    for n, p in model.named_parameters():
        if n in visual:
            safe_set_full_fp32_param(p, visual[n].to(p.device))
    return engine, optimizer, scheduler


# Settings that change the training trajectory; a checkpoint only resumes a run with the same ones.
_FINGERPRINT_FIELDS = ("stage", "llm", "init", "features_dir", "lr", "epochs", "max_steps", "batch_size", "grad_accum",
                       "max_length", "max_patches", "warmup_ratio", "min_lr_ratio", "weight_decay", "betas", "grad_clip",
                       "seed", "lora", "lora_r", "lora_alpha", "lora_dropout", "load_in_4bit", "model", "deepspeed")


def run_fingerprint(cfg: TrainConfig) -> str:
    """Hash of the training data and the settings that shape the run (not where it writes or how it logs)."""
    import hashlib

    from slidechat.checkpoint import model_digest, weights_digest

    h = hashlib.sha256(Path(cfg.data).read_bytes())
    settings = {k: getattr(cfg, k) for k in _FINGERPRINT_FIELDS}
    # what is at the paths, not only the paths: a stage-1 model trained again at the same path (the workflow
    # then reruns stage 2) must not be continued from checkpoints trained from the old one
    settings["llm_weights"] = weights_digest(cfg.llm) if cfg.llm else None
    settings["init_weights"] = model_digest(cfg.init) if cfg.init else None
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def resume(run: Run) -> int:
    """Load the newest checkpoint of this run from the work dir; returns the step to continue after (0: none).

    Checkpoints of other data or settings (with their log) are moved to `<work-dir>/stale/<their fingerprint>`.
    Ones written by another number of ranks are refused: each rank's share of the data, and so the run,
    depends on it.
    """
    work_dir, rank = run.work_dir, run.rank
    ckpts = list_checkpoints(work_dir)
    try:
        saved = json.loads((ckpts[-1] / "trainer_state.json").read_text()) if ckpts else None
    except ValueError as e:  # a file cut by a full disk
        raise TrainSetupError(f"{ckpts[-1] / 'trainer_state.json'}: not readable ({e}); remove {ckpts[-1]} to "
                              "resume from the checkpoint before it") from e
    run.barrier()  # every rank has read the newest checkpoint before rank 0 moves anything
    if saved is None:
        return 0
    if saved.get("fingerprint") != run.fingerprint:
        # other data or settings: these checkpoints (and their log) belong to another run; each such run keeps
        # its own folder, so a third setting never deletes the first one's
        stale = work_dir / "stale" / str(saved.get("fingerprint", "unknown"))[:12]
        if rank == 0:
            stale.mkdir(parents=True, exist_ok=True)
            for c in ckpts:
                shutil.rmtree(stale / c.name, ignore_errors=True)  # an earlier copy of the same run and step
                c.rename(stale / c.name)
            for name in ("train_log.csv", "tensorboard"):
                src, dest = work_dir / name, stale / name
                if src.exists():
                    shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
                    src.rename(dest)
        _note(f"checkpoints in {work_dir} came from other data or settings; moved to {stale} (move them back "
              "to resume that run), starting from step 0")
        run.barrier()
        return 0
    saved_world = int(saved.get("world_size", 1))
    if saved_world != run.world:
        raise TrainSetupError(f"{ckpts[-1]} was written by a run on {saved_world} rank(s), this one has {run.world}; "
                              f"the ranks' shares of the data differ, so it cannot continue that run. Resume on "
                              f"{saved_world} rank(s), or start over with another --work-dir")
    if run.engine is not None:
        state = load_deepspeed_checkpoint(run.engine, ckpts[-1], rank)
    else:
        state = load_checkpoint(ckpts[-1], run.model, run.optimizer, run.scheduler)
    start_step = int(state["step"])
    if rank == 0:
        print(f"resuming from {ckpts[-1]} (step {start_step}/{run.total_steps})", flush=True)
    return start_step


class _Subset(torch.utils.data.Dataset):
    """Micro-batches (lists of record indices) of the run, in order: DataLoader yields one batch per item."""

    def __init__(self, data: InstructionDataset, batches: list[list[int]]) -> None:
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.data[j] for j in self.batches[i]]


def run_steps(run: Run, start_step: int) -> bool:
    """Optimizer steps from `start_step` on, with checkpoints and the log; False when stopped early on request.

    One step is an accumulation window: forward + backward of each of its micro-batches (the loss
    divided by their number), then one optimizer step, as nanoGPT does.
    """
    cfg, work_dir = run.cfg, run.work_dir
    micro = [batch for step in run.steps[start_step:] for batch in step]
    loader = iter(torch.utils.data.DataLoader(
        _Subset(run.data, micro), batch_size=None, num_workers=cfg.num_workers,
        collate_fn=lambda b: collate(b, run.pad_id),
        generator=torch.Generator().manual_seed(cfg.seed)))  # own generator: the global RNG stays as checkpointed
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16)
    log = TrainLog(work_dir, start_step, enabled=run.rank == 0)
    progress = Progress(run.total_steps, f"stage {cfg.stage}", "step", initial=start_step, enabled=run.rank == 0)
    state = {"fingerprint": run.fingerprint, "total_steps": run.total_steps, "config": jsonable(cfg),
             "world_size": run.world}
    run.model.train()
    try:
        for step in range(start_step + 1, run.total_steps + 1):
            t0 = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses (read before the scheduler moves it)
            window = run.steps[step - 1]
            loss_sum = tokens = patches = 0.0
            for _ in window:
                batch = next(loader)
                with autocast:
                    loss = _forward(run, batch)
                _check_finite(run, loss, step, batch, work_dir)
                if run.engine is not None:
                    run.engine.backward(loss / len(window), scale_wrt_gas=False)
                else:
                    (loss / len(window)).backward()
                n_patches = sum(min(len(f), run.model.config.max_patches_train) for f in batch["features"])
                loss_sum += loss.item()
                tokens += int(batch["attention_mask"].sum()) - len(batch["features"]) + n_patches
                patches += n_patches
            grad_norm = _optimizer_step(run, step, work_dir)
            loss_sum, n_micro, tokens, patches = run.sum_over_ranks([loss_sum, len(window), tokens, patches])
            dt = time.perf_counter() - t0
            if step % cfg.log_steps == 0 or step == run.total_steps:
                log.log({"step": step, "loss": loss_sum / n_micro, "lr": lr, "tokens_per_s": tokens / dt,
                         "patches_per_s": patches / dt, "grad_norm": grad_norm})
                progress.update(1, loss=loss_sum / n_micro, lr=f"{lr:.3g}", **{"tokens/s": tokens / dt})
            else:
                progress.update(1)
            stopping = cfg.stop_after_step is not None and step >= cfg.stop_after_step
            if step % cfg.save_steps == 0 or step == run.total_steps or stopping:
                _save(run, step, state)
            if stopping and step < run.total_steps:
                if run.rank == 0:
                    print(f"stopped after step {step} as asked (--stop-after-step); rerun to resume", flush=True)
                return False
    finally:
        log.close()
        progress.close()
    return True


def _forward(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """Loss of one micro-batch (the slides stay on the CPU until the model has capped their patches)."""
    inputs = {k: batch[k].to(run.device) for k in ("input_ids", "attention_mask", "labels")}
    return (run.engine or run.model)(features=batch["features"], **inputs).loss


def _check_finite(run: Run, loss: torch.Tensor, step: int, batch: dict[str, Any], work_dir: Path) -> None:
    """Stop every rank together when any rank's loss is NaN or inf (one rank alone would hang the others)."""
    finite = bool(torch.isfinite(loss.detach()))
    if run.sum_over_ranks([float(not finite)])[0] == 0:
        return
    where = f"loss is {loss.item()} at step {step} (records {batch.get('ids')})" if not finite else \
        f"the loss of another rank is not finite at step {step}"
    raise TrainingDiverged(f"{where}; stopping. The last good checkpoint is kept in {work_dir}; lower --lr or check "
                           "the data, then rerun to resume from it.")


def _optimizer_step(run: Run, step: int, work_dir: Path) -> float:
    """Clip, step the optimizer and the schedule, clear the gradients; returns the gradient norm before clipping."""
    if run.engine is not None:
        run.engine.step()  # clips to the config's gradient_clipping and steps the schedule
        grad_norm = float(run.engine.get_global_grad_norm() or 0.0)
    else:
        clip = run.cfg.grad_clip if run.cfg.grad_clip and run.cfg.grad_clip > 0 else float("inf")
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step}; stopping. The last good checkpoint "
                               f"is kept in {work_dir}.")
    if run.engine is None:
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _save(run: Run, step: int, state: dict) -> None:
    work_dir, keep = run.work_dir, run.cfg.save_total_limit
    if run.engine is None:
        save_checkpoint(work_dir, step, run.model, run.optimizer, run.scheduler, state, keep)
        return
    tag = f"{CKPT_PREFIX}{step:08d}"
    run.engine.save_checkpoint(str(work_dir), tag=tag, client_state={**state, "step": step})
    torch.save(_rng_state(), work_dir / tag / f"rng_rank{run.rank}.pt")  # DeepSpeed keeps no RNG state
    run.barrier()  # every rank's files are written before the marker says the checkpoint is complete
    if run.rank == 0:  # the marker list_checkpoints looks for, written after DeepSpeed finished the tag
        write_json(work_dir / tag / "trainer_state.json", {**state, "step": step})
        if keep > 0:
            for old in list_checkpoints(work_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)


def _visual_fp32_state(run: Run) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed, the slide encoder's and projector's fp32 master weights (collective: every rank calls
    it); the engine's module holds only 16-bit copies of them under bf16, and only shards under ZeRO-3."""
    if run.engine is None:
        return None
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in run.model.named_parameters():
        if name.startswith(("LongNet_encoder.", "projector.")):
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:  # not trained: the module's value (gathered under ZeRO-3)
                with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                    full = p.detach().clone()
            out[name] = full.detach().float().cpu().contiguous()
    return out


def write_final(run: Run) -> None:
    """The declared output: model + training log + curves, renamed into place in one go (rank 0 writes)."""
    from safetensors.torch import save_file

    from preprocessing.stores import read_store_attrs
    from slidechat import __version__
    from slidechat.checkpoint import CONFIG_FILE, VISUAL_WEIGHTS_FILE, save_model
    from slidechat.model_card import training_card, write_model_card
    from slidechat.plots import plot_training_curves

    cfg, model = run.cfg, run.model
    visual = _visual_fp32_state(run)
    zero3 = run.engine is not None and run.engine.zero_optimization_stage() == 3
    if zero3:  # the LLM's (or adapters') 16-bit weights, gathered from the shards for the save
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.llm.parameters()), enabled=cfg.stage != 1)
    else:
        gathered = contextlib.nullcontext()
    with gathered:
        if run.rank == 0:
            with atomic_path(cfg.out, is_dir=True, replaces=CONFIG_FILE) as tmp:
                # Stage 1 leaves the LLM as it was: save a reference to it, not a copy (stage 2 gets --llm again).
                save_model(model, tmp, save_llm=cfg.stage != 1)
                if visual is not None:  # the fp32 masters instead of the engine's 16-bit copies
                    save_file(visual, str(tmp / VISUAL_WEIGHTS_FILE))
                shutil.copy(run.work_dir / "train_log.csv", tmp / "train_log.csv")
                plot_training_curves(tmp / "train_log.csv", tmp / "training_curves.png", title=f"stage {cfg.stage}")
                write_json(tmp / "training_config.json", jsonable(cfg))
                write_model_card(tmp, training_card(
                    cfg.stage, cfg.data, run.data.records, jsonable(cfg), run.total_steps,
                    base_llm=cfg.llm or model.llm_source, started_from=cfg.init, software=f"slidechat {__version__}",
                    store_attrs=read_store_attrs(run.data.store_path(run.data.records[0]))))
                if cfg.curves:
                    with atomic_path(cfg.curves) as png:
                        shutil.copy(tmp / "training_curves.png", png)
            print(f"wrote {cfg.out}", flush=True)
    run.barrier()  # no rank reports success before the model is there


# -------------------------------------------------------------------------------------------------- launcher


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: `gpu[03-05,09],cpu01` -> `gpu03` (what `scontrol show hostnames` lists first)."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed variables for a process started as one of several `srun` tasks (one per GPU).

    The SLURM profile launches `tasks_per_node` tasks per node with `srun`; each task is one rank. The
    rendezvous is the first host of the allocation on a port derived from the job id. Empty when not
    under a multi-task srun or when a launcher already set RANK.
    """
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def build_launch_command(n_gpus: int, n_nodes: int = 1, train_args: list[str] | None = None,
                         deepspeed_config: str = "configs/deepspeed/zero2.json", master_port: int = 29500,
                         env: Mapping[str, str] | None = None) -> str:
    """Shell command that runs `slidechat train` on n_gpus per node x n_nodes.

    One process on one device needs no launcher. Otherwise torchrun (`python -m torch.distributed.run` of
    this interpreter) starts one process per GPU with the
    DeepSpeed config; across nodes (one launch per node, e.g. `srun` in the SLURM profile) the rendezvous
    uses the SLURM job id, this node's SLURM_NODEID and the first host of the allocation.
    """
    env = os.environ if env is None else env
    args = " ".join(shlex.quote(a) for a in (train_args or []))
    if n_gpus < 1 or n_nodes < 1:
        raise ValueError("n_gpus and n_nodes must be at least 1")
    if n_gpus == 1 and n_nodes == 1:
        return f"{shlex.quote(sys.executable)} -m slidechat.cli train {args}".strip()
    # this interpreter's torchrun: a bare `torchrun` on PATH may belong to another environment
    parts = [shlex.quote(sys.executable), "-m", "torch.distributed.run", f"--nproc_per_node={n_gpus}",
             f"--nnodes={n_nodes}"]
    if n_nodes == 1:
        parts.append("--standalone")
    else:
        slurm = "SLURM_JOB_ID" in env
        host = env.get("MASTER_ADDR") or ('"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
                                          if slurm else None)
        if host is None:
            raise TrainSetupError("multi-node launch needs SLURM (SLURM_JOB_ID) or MASTER_ADDR in the environment")
        node_rank = "$SLURM_NODEID" if slurm else env.get("NODE_RANK", "0")
        run_id = "$SLURM_JOB_ID" if slurm else "slidechat"
        parts += [f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint={host}:{master_port}",
                  f"--rdzv_id={run_id}"]
    parts += ["-m", "slidechat.cli", "train"]
    cmd = " ".join(parts) + (f" {args}" if args else "")
    if "--deepspeed" in (train_args or []):
        return cmd
    return cmd + f" --deepspeed {shlex.quote(deepspeed_config)}"


# ------------------------------------------------------------------------------------------------------- CLI


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """A train_stage*.yaml: TrainConfig fields (unknown keys are an error naming them)."""
    import yaml

    try:
        data = yaml.safe_load(input_file(path, "training YAML", "--config").read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({where}{getattr(exc, 'problem', None) or exc}) "
                          "(option --config)") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of training options (option --config)")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown training option(s) {unknown}; the options are the flags of "
                          "`slidechat train --help`, with _ for - (option --config)")
    return data


MODEL_FLAGS = ("context", "bypass_slide_encoder", "encoder_layers", "encoder_ffn_dim", "encoder_heads")


def _parser() -> argparse.ArgumentParser:
    p = command_parser("slidechat train", __doc__,
                       "slidechat train --stage 1 --data stage1.json --features-dir F --llm LLM --out M --work-dir W")
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML with TrainConfig fields (flags given here override it)")
    add_arguments(p, TrainConfig)
    g = p.add_argument_group("model (config section `model`; a new stage-1 model)", argument_default=argparse.SUPPRESS)
    g.add_argument("--context", choices=["slide", "per_patch"], help="slide-level or per-patch context")
    g.add_argument("--bypass-slide-encoder", dest="bypass_slide_encoder", action="store_true",
                   help="no LongNet, features go straight to the projector")
    for name in ("encoder-layers", "encoder-ffn-dim", "encoder-heads"):
        g.add_argument(f"--{name}", dest=name.replace("-", "_"), type=int, help="LongNet size")
    g.add_argument("--model-config", dest="model_json",
                   help="JSON object of SlideChatConfig fields (overrides the YAML's `model:` and the flags above)")
    p.add_argument("--print-launch", nargs=2, type=int, metavar=("N_GPUS", "N_NODES"), dest="print_launch",
                   default=argparse.SUPPRESS, help="print the launcher command for this run on N_GPUS x N_NODES and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, dest="local_rank", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    return p


def config_from_args(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """TrainConfig from the YAML named by --config (if any), overridden by the flags given."""
    ns = _parser().parse_args(argv)
    values: dict[str, Any] = load_yaml_config(ns.config) if getattr(ns, "config", None) else {}
    model = {**values.get("model", {}), **{k: getattr(ns, k) for k in MODEL_FLAGS if hasattr(ns, k)}}
    if getattr(ns, "model_json", None):
        try:
            extra = json.loads(ns.model_json)
        except ValueError as exc:
            raise UsageError(f"--model-config: not a JSON object ({exc})") from exc
        if not isinstance(extra, dict):
            raise UsageError("--model-config: expected a JSON object of SlideChatConfig fields")
        model.update(extra)
    return from_arguments(TrainConfig, ns, base=values, model=model), ns


def main(argv: list[str]) -> int:
    cfg, ns = config_from_args(argv)
    if getattr(ns, "print_launch", None):
        i = argv.index("--print-launch")
        args = argv[:i] + argv[i + 3:]  # the run's own flags, without --print-launch N M
        print(build_launch_command(ns.print_launch[0], ns.print_launch[1], args,
                                   cfg.deepspeed or "configs/deepspeed/zero2.json"))
        return 0
    # One srun task per GPU (the SLURM profile): this process is a rank already, no launcher needed.
    os.environ.update(slurm_rank_env(os.environ))
    n_nodes = int(os.environ.get("SLURM_NNODES", "1"))
    if (cfg.gpus_per_node > 1 or n_nodes > 1) and "LOCAL_RANK" not in os.environ:
        import subprocess

        cmd = build_launch_command(max(1, cfg.gpus_per_node), n_nodes, argv,
                                   cfg.deepspeed or "configs/deepspeed/zero2.json")
        print(f"launching: {cmd}", flush=True)
        return subprocess.run(cmd, shell=True).returncode
    train(cfg)
    return 0
