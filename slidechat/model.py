"""SlideChat: LongNet slide encoder + 2-layer MLP projector + any Hugging Face causal LM.

One CONCH feature (512-d) per patch, in tiling (row-major) order, becomes one visual token:
features -> LongNet encoder -> Linear(512, H) -> GELU -> Linear(H, H), H = the LLM's hidden size.
The visual tokens replace the `<image>` placeholder (`IMAGE_TOKEN_INDEX`) of the first user turn.

`context` decides what the slide encoder sees:

* ``"per_patch"``: what the released SlideChat does. It permutes the features `[1, N, 512]` to
  `[N, 1, 512]` before the batch-first torchscale encoder, so each patch is its own length-1
  sequence: no information flows between patches. Forced when loading released weights.
* ``"slide"`` (default for new models): LongNet's dilated attention runs over the whole patch
  sequence, as the paper describes.

Module and parameter names (`LongNet_encoder`, `projector.model.{0,2}`, `llm`) are those of the
original checkpoints, so released weights load strictly without renaming.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidechat.longnet import LongNetConfig, LongNetEncoder
from slidechat.template import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    build_generation_prompt,
    stop_token_ids,
)

__all__ = ["IMAGE_TOKEN_INDEX", "IGNORE_INDEX", "SlideChat", "SlideChatConfig", "patch_cap_indices", "merge_visual_tokens"]

log = logging.getLogger(__name__)

CONTEXTS = ("slide", "per_patch")


# Sizes far beyond any SlideChat model: a config (or released state dict) outside them would build a model
# without bound (a hostile slidechat_config.json with 100,000 layers hangs) before its weights are checked.
_SIZE_LIMITS = {"feature_dim": (1, 1 << 14), "encoder_layers": (0, 64), "encoder_ffn_dim": (1, 1 << 16),
                "encoder_heads": (1, 256), "max_patches_train": (1, 1 << 24), "max_patches_infer": (1, 1 << 24),
                "visual_token_budget": (1, 1 << 24), "llm_hidden_size": (1, 1 << 16)}


@dataclass
class SlideChatConfig:
    """Model settings; saved in `slidechat_config.json` next to the weights."""

    feature_dim: int = 512
    # "slide": LongNet over the whole patch sequence; "per_patch": each patch alone (released SlideChat)
    context: str = "slide"
    # features straight to the projector (ablation in the original code)
    bypass_slide_encoder: bool = False
    # keep linspace(0, N-1, cap) rows when a slide has more patches (train / eval mode)
    max_patches_train: int = 10240
    max_patches_infer: int = 38400
    # LongNet settings (SlideChat's LongNet_2_layers_512_dim as built); the embed dim is feature_dim
    encoder_layers: int = 2
    encoder_ffn_dim: int = 1024
    encoder_heads: int = 8
    segment_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    dilated_ratios: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    # beyond the original (off by default): merge neighbouring patches' visual tokens so at most
    # this many reach the LLM
    visual_token_budget: int | None = None
    gradient_checkpointing: bool = False
    # filled in from the LLM when the model is built
    llm_hidden_size: int | None = None

    def __post_init__(self) -> None:
        for name, (low, high) in _SIZE_LIMITS.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)
                                      or not low <= value <= high):
                raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
        if len(self.segment_lengths) > 64 or len(self.dilated_ratios) > 64:
            raise ValueError("segment_lengths and dilated_ratios take at most 64 entries")
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        self.segment_lengths = [int(s) for s in self.segment_lengths]
        self.dilated_ratios = [int(r) for r in self.dilated_ratios]

    def longnet(self) -> LongNetConfig:
        return LongNetConfig(
            embed_dim=self.feature_dim,
            ffn_dim=self.encoder_ffn_dim,
            num_heads=self.encoder_heads,
            num_layers=self.encoder_layers,
            segment_lengths=list(self.segment_lengths),
            dilated_ratios=list(self.dilated_ratios),
            dropout=self.dropout,
            drop_path_rate=self.drop_path_rate,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SlideChatConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SlideChat config keys: {unknown}")
        return cls(**d)


class Projector(nn.Module):
    """Linear(F -> H) -> GELU -> Linear(H -> H); keys `model.0.*`, `model.2.*` as xtuner's ProjectorModel."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def patch_cap_indices(n: int, cap: int) -> np.ndarray | None:
    """Rows of a slide's n patches kept under the patch cap: `linspace(0, n-1, cap)` truncated to int (as the
    original), or None when all n are kept. The model is the one place the cap is applied (`encode_slide`)."""
    if n <= cap:
        return None
    return np.linspace(0, n - 1, cap, dtype=int)


def merge_visual_tokens(tokens: Tensor, coords: Tensor | np.ndarray | None, budget: int) -> Tensor:
    """Average neighbouring patches' tokens on a coarser grid until at most `budget` remain.

    With coordinates, patches fall into square cells of f x f patch pitches (f = 1, 2, 3, ...;
    the smallest f that meets the budget); cells come out in row-major order. Without
    coordinates, runs of consecutive patches (tiling order) are averaged.
    """
    n = tokens.shape[0]
    if n <= budget:
        return tokens
    if coords is None:
        group = -(-n // budget)
        cell = torch.arange(n, device=tokens.device) // group
    else:
        xy = torch.as_tensor(np.asarray(coords), dtype=torch.long)
        if xy.shape != (n, 2):
            raise ValueError(f"coords must be [{n}, 2], got {tuple(xy.shape)}")
        grid = []
        for axis in range(2):
            u = torch.unique(xy[:, axis])
            steps = torch.diff(u)
            pitch = int(steps.min()) if steps.numel() else 1
            grid.append((xy[:, axis] - u[0]) // max(pitch, 1))
        gx, gy = grid
        f = 1
        while True:
            cx, cy = gx // f, gy // f
            key = cy * (int(cx.max()) + 1) + cx  # row-major: y then x
            uniq, cell = torch.unique(key, return_inverse=True)
            if uniq.numel() <= budget:
                break
            f += 1
        cell = cell.to(tokens.device)
    m = int(cell.max()) + 1
    summed = tokens.new_zeros(m, tokens.shape[1]).index_add_(0, cell, tokens)
    counts = torch.bincount(cell, minlength=m).to(tokens.dtype).clamp_min(1)
    return summed / counts[:, None]


class SlideChat(nn.Module):
    """The SlideChat model. Build with `slidechat.checkpoint.new_model` (fresh slide encoder on a base LLM) or
    `slidechat.checkpoint.load_model` (saved or released weights); `checkpoint.save_model` writes it."""

    def __init__(self, llm: nn.Module, tokenizer: Any, config: SlideChatConfig, llm_source: str | None = None) -> None:
        super().__init__()
        hidden = int(llm.get_input_embeddings().weight.shape[1])
        if config.llm_hidden_size is not None and config.llm_hidden_size != hidden:
            raise ValueError(f"config llm_hidden_size {config.llm_hidden_size} != the LLM's hidden size {hidden}")
        config.llm_hidden_size = hidden
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.llm_source = llm_source  # base LLM directory (recorded in saved checkpoints)
        self.llm_weights_loaded = True  # False when a checkpoint carried no LLM weights (stage 1)
        self.LongNet_encoder = LongNetEncoder(config.longnet())
        self.projector = Projector(config.feature_dim, hidden)
        if config.gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # ------------------------------------------------------------------------------------------
    # helpers

    @property
    def device(self) -> torch.device:
        return self.projector.model[0].weight.device

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Activation checkpointing in the slide encoder layers and the LLM (non-reentrant by default)."""
        self.config.gradient_checkpointing = True
        self.LongNet_encoder.gradient_checkpointing = True
        ckpt_kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        # transformers 5 renamed the method (and its kwargs); the old name still works but warns
        if hasattr(self.llm, "activation_checkpointing_enable"):
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        elif hasattr(self.llm, "gradient_checkpointing_enable"):
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.config.gradient_checkpointing = False
        self.LongNet_encoder.gradient_checkpointing = False
        disable = getattr(self.llm, "activation_checkpointing_disable", None) or getattr(
            self.llm, "gradient_checkpointing_disable", None)
        if disable is not None:
            disable()

    def _embed(self, ids: Tensor) -> Tensor:
        return self.llm.get_input_embeddings()(ids)

    # ------------------------------------------------------------------------------------------
    # slide encoding

    def encode_slide(self, features: Tensor | np.ndarray, coords: Tensor | np.ndarray | None = None) -> Tensor:
        """Visual tokens of one slide: patch cap -> slide encoder -> projector (-> token budget).

        features: [N, feature_dim] in tiling order; returns [N', H] with N' = min(N, cap) (or the
        visual-token budget). The cap is `max_patches_train` in training mode, else `max_patches_infer`.
        """
        x = torch.as_tensor(features)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 2 or x.shape[1] != self.config.feature_dim:
            raise ValueError(f"features must be [N, {self.config.feature_dim}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("a slide with no patches cannot be encoded")
        cap = self.config.max_patches_train if self.training else self.config.max_patches_infer
        keep = patch_cap_indices(x.shape[0], cap)
        if keep is not None:
            x = x[torch.from_numpy(keep)]
            if coords is not None:
                coords = np.asarray(coords)[keep]
        param = self.projector.model[0].weight
        x = x.to(device=param.device, dtype=param.dtype)
        if not self.config.bypass_slide_encoder:
            if self.config.context == "slide":
                x = self.LongNet_encoder(x[None])[0]
            else:  # per_patch: batch of N length-1 sequences (the released model's behaviour)
                x = self.LongNet_encoder(x[:, None, :])[:, 0]
        tokens = self.projector(x)
        budget = self.config.visual_token_budget
        if budget is not None and tokens.shape[0] > budget:
            tokens = merge_visual_tokens(tokens, coords, budget)
        return tokens

    # ------------------------------------------------------------------------------------------
    # training forward

    def _splice(self, ids: Tensor, labels: Tensor | None, visual: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Embeddings (and labels) of one unpadded sample with its visual tokens in place of the placeholder."""
        where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        emb_dtype = self.llm.get_input_embeddings().weight.dtype
        if where.numel() == 0:
            return self._embed(ids), labels
        if where.numel() > 1:
            raise ValueError("one image placeholder per sample is supported")
        if visual is None:
            raise ValueError("sample has an <image> placeholder but no slide features")
        i = int(where[0])
        text = self._embed(torch.cat([ids[:i], ids[i + 1:]]))
        emb = torch.cat([text[:i], visual.to(device=text.device, dtype=emb_dtype), text[i:]], dim=0)
        if labels is not None:
            fill = labels.new_full((visual.shape[0],), IGNORE_INDEX)
            labels = torch.cat([labels[:i], fill, labels[i + 1:]])
        return emb, labels

    def forward(
        self,
        features: Sequence[Tensor | None] | Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        coords: Sequence[Any] | None = None,
        visual_embeds: Sequence[Tensor | None] | None = None,
        **llm_kwargs: Any,
    ) -> Any:
        """LLM forward with each sample's visual tokens spliced in at its `IMAGE_TOKEN_INDEX`.

        features: one [N_i, F] tensor per sample (or None for text-only samples); input_ids
        [B, T] padded (either side; the mask says where); labels [B, T] or None. The result
        (right-padded, position ids restarting per sample) goes to the LLM; returns its output.
        Without labels `.logits` is [B, T', V] over the expanded sequence; with labels only the
        positions that predict a labelled token get logits (`.logits` [n_labelled, V], in batch
        order) and `.loss` is their mean next-token cross-entropy.
        """
        if input_ids is None:
            raise ValueError("input_ids is required")
        bsz = input_ids.shape[0]
        if isinstance(features, Tensor):
            features = [features] if features.ndim == 2 else list(features)
        features = list(features) if features is not None else [None] * bsz
        if len(features) != bsz:
            raise ValueError(f"{len(features)} feature tensors for a batch of {bsz}")
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        embeds, new_labels = [], []
        for b in range(bsz):
            ids = input_ids[b][mask[b]]
            lab = labels[b][mask[b]] if labels is not None else None
            visual = None
            if (ids == IMAGE_TOKEN_INDEX).any():
                if visual_embeds is not None and visual_embeds[b] is not None:
                    visual = visual_embeds[b]
                elif features[b] is not None:
                    visual = self.encode_slide(features[b], coords[b] if coords is not None else None)
            e, lab = self._splice(ids, lab, visual)
            embeds.append(e)
            new_labels.append(lab)
        t_max = max(e.shape[0] for e in embeds)
        hidden = embeds[0].shape[1]
        device = embeds[0].device
        inputs = embeds[0].new_zeros(bsz, t_max, hidden)
        att = torch.zeros(bsz, t_max, dtype=torch.long, device=device)
        pos = torch.zeros(bsz, t_max, dtype=torch.long, device=device)
        lab_out = torch.full((bsz, t_max), IGNORE_INDEX, dtype=torch.long, device=device) if labels is not None else None
        for b, e in enumerate(embeds):
            n = e.shape[0]
            inputs[b, :n] = e
            att[b, :n] = 1
            pos[b, :n] = torch.arange(n, device=device)
            if lab_out is not None:
                lab_out[b, :n] = new_labels[b]
        if lab_out is None:
            return self.llm(inputs_embeds=inputs, attention_mask=att, position_ids=pos, **llm_kwargs)
        # Only positions whose next token is labelled need logits: ~100 text positions instead of the
        # ~10k visual ones, whose full-vocabulary logits (and their gradients) are GiBs on a 7B model.
        target = torch.full_like(lab_out, IGNORE_INDEX)
        target[:, :-1] = lab_out[:, 1:]
        labelled = target != IGNORE_INDEX
        out = self.llm(inputs_embeds=inputs, attention_mask=att, position_ids=pos, logits_to_keep=labelled,
                       **llm_kwargs)
        # the mean over labelled tokens, as the LLM's own causal-LM loss (logits in fp32); a batch whose replies
        # max_length cut off entirely has none: loss 0 with zero gradients, not the NaN of an empty mean
        n_labelled = labelled.sum().clamp(min=1)
        out.loss = F.cross_entropy(out.logits.float(), target[labelled], reduction="sum") / n_labelled
        return out

    # ------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(
        self,
        features: Tensor | np.ndarray | None = None,
        question: str | Sequence[str] = "",
        *,
        visual_embeds: Tensor | None = None,
        coords: Tensor | np.ndarray | None = None,
        history: Sequence[tuple[str, str]] | None = None,
        max_new_tokens: int = 500,
        **gen_kwargs: Any,
    ) -> str | list[str]:
        """Answer `question` about one slide (greedy unless sampling kwargs are given; stops at `<|im_end|>`).

        A list of questions runs as one left-padded batch sharing one `encode_slide` result; pass
        `visual_embeds` (from `encode_slide`) to reuse an encoding across calls. `history` holds
        earlier (question, answer) turns for multi-turn chat. Uses the LLM's KV cache.
        """
        from transformers import GenerationConfig

        single = isinstance(question, str)
        questions = [question] if single else list(question)
        if not questions:
            return []
        if visual_embeds is None and features is not None:
            visual_embeds = self.encode_slide(features, coords)
        rows = []
        for q in questions:
            ids = build_generation_prompt(self.tokenizer, q, history, with_image=visual_embeds is not None)
            ids_t = torch.tensor(ids, device=self.llm.get_input_embeddings().weight.device)
            e, _ = self._splice(ids_t, None, visual_embeds)
            rows.append(e)
        t_max = max(r.shape[0] for r in rows)
        inputs = rows[0].new_zeros(len(rows), t_max, rows[0].shape[1])
        att = torch.zeros(len(rows), t_max, dtype=torch.long, device=inputs.device)
        for i, r in enumerate(rows):  # left padding: generation continues every row at its end
            inputs[i, t_max - r.shape[0]:] = r
            att[i, t_max - r.shape[0]:] = 1
        stops = stop_token_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "use_cache": True,
                                    "eos_token_id": stops, "pad_token_id": pad}
        settings.update(gen_kwargs)
        out = self.llm.generate(inputs_embeds=inputs, attention_mask=att, generation_config=GenerationConfig(**settings))
        texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return texts[0] if single else texts
