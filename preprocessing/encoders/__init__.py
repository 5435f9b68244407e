"""Patch encoders: a small registry, built offline from local checkpoints.

    from preprocessing.encoders import build_encoder
    enc = build_encoder("conch_v1", checkpoint="weights/conch/pytorch_model.bin", transform="conch_official")
    feats = enc(enc.preprocess(uint8_batch))        # uint8 [B, H, W, 3] -> [B, 512]

Registered names: `conch_v1` (CONCH ViT-B/16, 512-d), `conch_tiny` (same code, small, random weights from a
fixed seed, 512-d), `resnet50_trunc` (timm ResNet-50 cut after layer 3, 1024-d) and `timm:<model name>`
(any timm model, pooled features). Nothing is ever downloaded: real encoders need `checkpoint` (config key
`features.checkpoint`, option `--checkpoint`); `allow_random=True` builds them with seeded random weights for
benchmarks and tests, and that is recorded (sha256 null, seed set).
"""

from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from wsicore.errors import InputError
from wsicore.files import sha256_file, write_json

from .errors import UnknownEncoderError
from .transforms import TRANSFORMS, Preprocess, TransformSpec, get_transform

CHECKPOINT_CONFIG_KEY = "features.checkpoint"


class EncoderCheckpointError(InputError, ValueError):
    """An encoder that cannot be built: an unknown name, or a checkpoint that is missing, unreadable, or does not
    match the architecture."""


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def _require_checkpoint(path: str | os.PathLike, encoder: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EncoderCheckpointError(
            f"checkpoint for encoder {encoder!r} not found: {p} (option --encoder-checkpoint: a local weights file)",
            config_hint=f"set `{CHECKPOINT_CONFIG_KEY}` to a local weights file")
    if not os.access(p, os.R_OK):
        raise EncoderCheckpointError(f"checkpoint for encoder {encoder!r} is not readable: {p} "
                                     "(option --encoder-checkpoint)", config_hint=CHECKPOINT_CONFIG_KEY)
    return p


_HASH_LOCK = threading.Lock()


def _hash_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "wsi-slidechat" / "checkpoint_sha256.json"


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file, cached by (real path, mtime, size) so reruns do not re-hash gigabytes."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256(str(p), st.st_mtime_ns, st.st_size)


@functools.cache
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of `path` as it was at (mtime, size): from the on-disk cache shared by runs, else hashed."""
    cache_key = f"{path}|{mtime_ns}|{size}"
    with _HASH_LOCK:
        cache_file = _hash_cache_file()
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        digest = cache.get(cache_key)
        if digest is None:
            digest = sha256_file(path)
            cache[cache_key] = digest
            try:
                write_json(cache_file, cache)
            except OSError:
                pass  # a read-only home only costs a re-hash next time
        return digest


# --------------------------------------------------------------------------------------------------
# The encoder wrapper
# --------------------------------------------------------------------------------------------------
class PatchEncoder(nn.Module):
    """A patch encoder with its input transform: `enc(enc.preprocess(uint8 [B,H,W,3])) -> [B, D]`."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        transform: TransformSpec,
        feature_dim: int,
        config: dict,
        checkpoint: Path | None,
        checkpoint_sha256: str | None,
        seed: int | None,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.preprocessor = Preprocess(transform)
        self.transform = transform
        self.feature_dim = feature_dim
        self.config = config
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256
        self.seed = seed
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.preprocessor.scale.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, H, W, 3]` -> normalised float `[B, 3, S, S]` on this module's device."""
        return self.preprocessor(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def describe(self) -> dict:
        """What identifies these features; recorded in every store and compared on resume."""
        return {
            "encoder": self.name,
            "encoder_config": self.config,
            "feature_dim": self.feature_dim,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "seed": self.seed,
            "transform": self.transform.name,
            "transform_spec": self.transform.to_dict(),
        }


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
# A builder gets (checkpoint path or None, seed) and returns (model, feature_dim, config dict).
Builder = Callable[[Path | None, int], tuple[nn.Module, int, dict]]


@dataclass(frozen=True)
class EncoderEntry:
    builder: Builder
    default_transform: str
    needs_checkpoint: bool = True  # False: random weights from the seed are the intended weights (tiny demo model)


def _conch(shape: str) -> Builder:
    """Builder of the CONCH vision tower with the shape `conch.<shape>` (CONCH_V1, CONCH_TINY)."""

    def build(checkpoint: Path | None, seed: int) -> tuple[nn.Module, int, dict]:
        from . import conch

        return conch.build_conch(getattr(conch, shape), checkpoint, seed)

    return build


def _resnet50_trunc(checkpoint: Path | None, seed: int) -> tuple[nn.Module, int, dict]:
    from .timm_models import build_resnet50_trunc

    return build_resnet50_trunc(checkpoint, seed)


ENCODERS: dict[str, EncoderEntry] = {
    "conch_v1": EncoderEntry(_conch("CONCH_V1"), "conch_official"),  # CONCH ViT-B/16 vision tower, 512-d
    "conch_tiny": EncoderEntry(_conch("CONCH_TINY"), "slidechat", needs_checkpoint=False),  # demo/tests, 512-d
    "resnet50_trunc": EncoderEntry(_resnet50_trunc, "imagenet"),  # timm ResNet-50 cut after layer 3, 1024-d
}


def available_encoders() -> list[str]:
    return sorted(ENCODERS) + ["timm:<model name>"]


def build_encoder(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    transform: str | TransformSpec | None = None,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    allow_random: bool = False,
) -> PatchEncoder:
    """Build a registered encoder (`conch_v1`, `conch_tiny`, `resnet50_trunc`, `timm:<name>`) offline.

    `checkpoint` is a local weights file, loaded strictly. Encoders with published weights refuse to run
    without one unless `allow_random=True` (benchmarks, tests); `transform` defaults to the encoder's own.
    """
    ckpt = _require_checkpoint(checkpoint, name) if checkpoint is not None else None
    if name.startswith("timm:"):
        from .timm_models import build_timm_model

        if ckpt is None and not allow_random:
            raise EncoderCheckpointError(
                f"encoder {name!r} needs its weights: pass --encoder-checkpoint FILE, a local file (nothing is "
                "downloaded)", config_hint=f"set `{CHECKPOINT_CONFIG_KEY}`")
        model, dim, config, default_spec = build_timm_model(name[len("timm:") :], ckpt, seed)
        spec = get_transform(transform) if transform is not None else default_spec
    else:
        if name not in ENCODERS:
            raise UnknownEncoderError(f"unknown encoder {name!r}; choose one of {available_encoders()} "
                                      "(option --encoder)", config_hint="features.encoder")
        entry = ENCODERS[name]
        if ckpt is None and entry.needs_checkpoint and not allow_random:
            raise EncoderCheckpointError(
                f"encoder {name!r} needs its weights: pass --encoder-checkpoint FILE, a local file (nothing is "
                "downloaded)", config_hint=f"set `{CHECKPOINT_CONFIG_KEY}`")
        spec = get_transform(transform if transform is not None else entry.default_transform)
        model, dim, config = entry.builder(ckpt, seed)
    enc = PatchEncoder(
        name=name,
        model=model,
        transform=spec,
        feature_dim=dim,
        config=config,
        checkpoint=ckpt,
        checkpoint_sha256=checkpoint_sha256(ckpt) if ckpt is not None else None,
        seed=None if ckpt is not None else seed,
    )
    if device is not None:
        enc.to(device)
    return enc


__all__ = [
    "CHECKPOINT_CONFIG_KEY",
    "ENCODERS",
    "TRANSFORMS",
    "EncoderCheckpointError",
    "PatchEncoder",
    "TransformSpec",
    "available_encoders",
    "build_encoder",
    "checkpoint_sha256",
    "get_transform",
]
