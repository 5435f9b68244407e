"""CONCH vision tower (our implementation) with strict loading of the official checkpoint.

The architecture is that of CONCH ViT-B/16 (Lu et al., 2024): a timm `VisionTransformer` trunk
(patch 16, 448 px position grid, resampled on the fly for other input sizes), an attentional pooler with
one learned query attending over all trunk tokens, and a LayerNorm. The patch feature is the pooled,
normalised query before the contrastive projection, i.e. the official
`CoCa.encode_image(x, proj_contrast=False, normalize=False)`, 512-d.

Parameter names follow the official checkpoint's `visual.*` keys exactly, so `pytorch_model.bin`
loads strictly (`wsicore.torchfile.load_strict`); the official loader uses `strict=False` and would
silently run with random weights for any key it does not find. The text tower and the captioning decoder
in the checkpoint are known, expected extras and are skipped; any other unknown key, or a missing one, is
an error that names it. The file is read as data only (`wsicore.torchfile.read_state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from wsicore.errors import InputError
from wsicore.torchfile import load_strict, read_state_dict

from .seeding import seeded

# Keys of the full CoCa checkpoint that belong to the text side; the vision tower does not use them.
NON_VISUAL_PREFIXES = ("text.", "text_decoder.", "logit_scale")


@dataclass(frozen=True)
class ConchVisionConfig:
    """Shape of the CONCH vision tower. The defaults are CONCH v1 (ViT-B/16, 448 px)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 448  # size of the learned position grid; other input sizes are resampled
    embed_dim: int = 512  # output feature size (attentional pooler width)
    pooler_heads: int = 8
    caption_pooler: bool = True  # present in the official weights; unused for features
    embed_dim_caption: int = 768
    n_queries_caption: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


CONCH_V1 = ConchVisionConfig()
# Same code, small enough for the demo and tests on two CPU cores; output stays 512-d like CONCH.
CONCH_TINY = ConchVisionConfig(width=64, layers=2, heads=4, image_size=224, caption_pooler=False)


class AttentionalPooler(nn.Module):
    """Learned queries attending over context tokens (cross-attention, LayerNorm on both sides)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]


class ConchVisionTower(nn.Module):
    """CONCH image encoder: `forward(x [B,3,H,W]) -> [B, embed_dim]` unprojected, unnormalised features."""

    def __init__(self, cfg: ConchVisionConfig = CONCH_V1) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.layers,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=0,
            dynamic_img_size=True,  # 224 px input on a 448 px position grid, as SlideChat's features were made
        )
        self.attn_pool_contrast = AttentionalPooler(cfg.embed_dim, cfg.width, cfg.pooler_heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(cfg.embed_dim)
        # Contrastive projection: part of the checkpoint, not of the feature (proj_contrast=False).
        self.proj_contrast = nn.Parameter(cfg.embed_dim**-0.5 * torch.randn(cfg.embed_dim, cfg.embed_dim))
        if cfg.caption_pooler:
            self.attn_pool_caption = AttentionalPooler(
                cfg.embed_dim_caption, cfg.width, cfg.pooler_heads, n_queries=cfg.n_queries_caption
            )
            self.ln_caption = nn.LayerNorm(cfg.embed_dim_caption)

    @property
    def feature_dim(self) -> int:
        return self.cfg.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def build_conch(cfg: ConchVisionConfig, checkpoint: Path | None, seed: int) -> tuple[nn.Module, int, dict]:
    """The vision tower of shape `cfg`: weights from `checkpoint`, else random from `seed`."""
    model = seeded(seed, lambda: ConchVisionTower(cfg))
    if checkpoint is not None:
        load_conch_checkpoint(model, checkpoint)
    return model, cfg.embed_dim, {"arch": "conch_vision", **cfg.to_dict()}


def conch_visual_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's entries of a CONCH checkpoint (full CoCa `visual.*` or vision-only), prefix removed.

    Text-side keys are dropped; any other key is kept as it is, so that strict loading names it.
    """
    if not any(k.startswith("visual.") for k in state):
        return dict(state)  # already a vision-tower-only state dict (e.g. saved from ConchVisionTower)
    return {k.removeprefix("visual."): v for k, v in state.items() if not k.startswith(NON_VISUAL_PREFIXES)}


def load_conch_checkpoint(model: ConchVisionTower, path: str | Path) -> None:
    """Load a CONCH checkpoint strictly into `model`; position grid resampled when its size differs."""
    state = conch_visual_state_dict(read_state_dict(path))
    pos = state.get("trunk.pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != model.trunk.pos_embed.shape:
        # As the official loader does: the checkpoint's grid is interpolated to the model's grid, when it is
        # one (a square of positions after the class token) of a plausible size, never gigabytes of one.
        n, limit = pos.shape[1] - 1, 4 * max(model.trunk.patch_embed.grid_size)
        side = math.isqrt(max(n, 0))
        why = ("are not a square grid" if side * side != n or n == 0 else
               f"form a {side} x {side} grid, more than {limit} per side" if side > limit else
               f"have width {pos.shape[-1]}, the model {model.trunk.embed_dim}"
               if pos.shape[-1] != model.trunk.embed_dim else None)
        if why:
            raise InputError(f"CONCH checkpoint {path}: trunk.pos_embed {tuple(pos.shape)} cannot be resampled to "
                             f"this model's grid: its {n} positions after the class token {why}")
        state["trunk.pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.trunk.patch_embed.grid_size), num_prefix_tokens=1, interpolation="bilinear",
            antialias=False,
        )
    load_strict(model, state, f"CONCH checkpoint {path}")
