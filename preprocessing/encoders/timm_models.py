"""timm encoders: ResNet-50 truncated after layer 3 (CLAM/TRIDENT `resnet50_trunc`) and any timm model by name.

Weights come only from a local checkpoint (timm/torchvision state dict, read as data by
`wsicore.torchfile.read_state_dict`). Loading is strict (`wsicore.torchfile.load_strict`) except for the
layers the encoder deliberately drops (ResNet `layer4`/`fc`, a model's classifier head); any other
missing or unexpected key is an error naming it.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from torch import nn

from wsicore.torchfile import load_strict, read_state_dict

from .errors import UnknownEncoderError
from .seeding import seeded
from .transforms import TransformSpec


class ResNet50Trunc(nn.Module):
    """ResNet-50 stem + layers 1-3, global average pooled: `[B, 3, H, W] -> [B, 1024]`."""

    def __init__(self) -> None:
        super().__init__()
        # features_only keeps the original module names (conv1, layer1, ...), so torchvision/timm
        # ResNet-50 checkpoints load without renaming; out_indices=(3,) drops layer4 and the classifier.
        self.net = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.net(x)[-1]).flatten(1)


def build_resnet50_trunc(checkpoint: Path | None, seed: int) -> tuple[nn.Module, int, dict]:
    model = seeded(seed, ResNet50Trunc)
    if checkpoint is not None:
        load_strict(model.net, _without(read_state_dict(checkpoint), ("layer4.", "fc.")), str(checkpoint))
    return model, 1024, {"arch": "timm", "model": "resnet50", "truncated_after": "layer3", "pool": "avg"}


class TimmPooled(nn.Module):
    """Any timm model with its classifier removed: pooled pre-logit features `[B, D]`."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        if ":" in model_name or "/" in model_name:  # hf-hub:..., local-dir:...: timm would fetch or read a config
            raise UnknownEncoderError(f"encoder `timm:{model_name}`: only timm's own architectures are built by name "
                                      "(e.g. timm:vit_base_patch16_224); hub and folder references are refused, as "
                                      "nothing is downloaded at run time. Pass the weights with --checkpoint")
        try:
            self.net = timm.create_model(model_name, pretrained=False, num_classes=0)
        except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
            raise UnknownEncoderError(f"timm has no model {model_name!r} (encoder `timm:{model_name}`): {exc}") from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_timm_model(
    model_name: str, checkpoint: Path | None, seed: int
) -> tuple[nn.Module, int, dict, TransformSpec]:
    """A timm model by name, its feature size, a config record and the transform timm defines for it."""
    model = seeded(seed, lambda: TimmPooled(model_name))
    net = model.net
    if checkpoint is not None:
        classifier = net.pretrained_cfg.get("classifier") or "head"
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        load_strict(net, _without(read_state_dict(checkpoint), tuple(h + "." for h in heads)), str(checkpoint))
    data_cfg = timm.data.resolve_data_config({}, model=net)
    size = int(data_cfg["input_size"][-1])
    crop_pct = float(data_cfg.get("crop_pct", 1.0) or 1.0)
    interp = data_cfg.get("interpolation", "bicubic")
    spec = TransformSpec(
        name=f"timm:{model_name}",
        size=size,
        resize=int(math.floor(size / crop_pct)),
        interpolation=interp if interp in {"bicubic", "bilinear"} else "bicubic",
        mean=tuple(float(m) for m in data_cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(s) for s in data_cfg["std"]),  # type: ignore[arg-type]
    )
    return model, int(net.num_features), {"arch": "timm", "model": model_name, "pool": "timm default"}, spec


def _without(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The state dict less the layers the encoder drops on purpose."""
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}
