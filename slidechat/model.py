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

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preprocessing.atomic import atomic_path, write_json
from slidechat.longnet import LongNetConfig, LongNetEncoder
from slidechat.template import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    build_generation_prompt,
    stop_token_ids,
)

__all__ = ["IMAGE_TOKEN_INDEX", "IGNORE_INDEX", "SlideChat", "SlideChatConfig", "select_patches", "merge_visual_tokens"]

log = logging.getLogger(__name__)

CONFIG_FILE = "slidechat_config.json"
VISUAL_WEIGHTS_FILE = "slide_encoder.safetensors"
LLM_SUBDIR = "llm"
ADAPTER_SUBDIR = "llm_adapter"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT_VERSION = 1
CONTEXTS = ("slide", "per_patch")


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
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        for name in ("max_patches_train", "max_patches_infer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.visual_token_budget is not None and self.visual_token_budget < 1:
            raise ValueError("visual_token_budget must be >= 1 or None")
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


def select_patches(n: int, cap: int) -> np.ndarray | None:
    """Row indices kept under a patch cap: `linspace(0, n-1, cap)` truncated to int (as the original), or None."""
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


def _require_dir(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise FileNotFoundError(f"no LLM directory given: set `llm` (config key / --llm option) to a local {what}")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"LLM directory not found: {p} (set `llm`, the config key / --llm option, to a local {what})")
    return p


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _load_llm(path: Path, torch_dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def _llm_from_state_dict(path: Path, weights: dict[str, Tensor], torch_dtype: torch.dtype | None) -> nn.Module:
    """Build the LLM of `path`'s config and fill it strictly from `weights` (no base weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        llm = AutoModelForCausalLM.from_config(config)
    expected = set(llm.state_dict().keys())
    got = set(weights)
    missing = sorted(expected - got)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False))
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = sorted(got - expected)
    if missing or unexpected:
        raise KeyError(
            "LLM weights in the checkpoint do not match the LLM architecture of "
            f"{path}: missing {len(missing)} {missing[:10]}, unexpected {len(unexpected)} {unexpected[:10]}"
        )
    if torch_dtype is not None:
        weights = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in weights.items()}
    llm.load_state_dict(weights, strict=False, assign=True)
    if tied and "lm_head.weight" not in got:
        llm.tie_weights()
    left = [n for n, p in llm.named_parameters() if p.device.type == "meta"]
    if left:
        raise KeyError(f"LLM parameters not filled from the checkpoint: {left[:10]}")
    return llm.eval()


class SlideChat(nn.Module):
    """The SlideChat model. Build with `from_llm` (new) or `from_pretrained` (saved/released)."""

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
    # construction

    @classmethod
    def from_llm(
        cls,
        llm_dir: str | Path,
        config: SlideChatConfig | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> "SlideChat":
        """A new model: fresh slide encoder + projector (fp32), the LLM and tokenizer from a local directory."""
        path = _require_dir(llm_dir, "Hugging Face causal LM directory")
        config = config or SlideChatConfig()
        model = cls(_load_llm(path, torch_dtype), _load_tokenizer(path), config, llm_source=str(path))
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        llm: str | Path | None = None,
        torch_dtype: torch.dtype | None = None,
        config: SlideChatConfig | None = None,
    ) -> "SlideChat":
        """Load our model directory, or a released SlideChat checkpoint, strictly.

        Accepted: our directory (`slidechat_config.json`); a DeepSpeed folder holding
        `mp_rank_00_model_states.pt` (e.g. `stage2_pth/`); that file or any `.pt/.pth` whose dict is
        the state dict or nests it under `module`/`state_dict`; xtuner's `save_pretrained` folder
        (`LongNet_encoder/`, `projector/`, LLM files or `llm_adapter/`). `llm` is the base LLM
        directory (config + tokenizer), required for released checkpoints and for models saved
        without LLM weights or with a PEFT adapter. For released weights, `config` may give the
        LongNet head count and patch caps; layer sizes come from the weights and `context` is
        forced to "per_patch" (what the released model was trained with).
        """
        from slidechat import checkpoint as ckpt

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.is_dir() and (path / CONFIG_FILE).is_file():
            return cls._from_our_dir(path, llm, torch_dtype)
        if path.is_dir() and (path / "LongNet_encoder").is_dir() and (path / "projector").is_dir():
            return cls._from_xtuner_dir(path, llm, torch_dtype, config)
        if path.is_dir():
            f = ckpt.find_deepspeed_model_file(path)
            if f is None:
                raise FileNotFoundError(
                    f"{path} is neither our model directory ({CONFIG_FILE}), an xtuner folder "
                    f"(LongNet_encoder/, projector/) nor a DeepSpeed folder ({ckpt.DEEPSPEED_MODEL_FILE})"
                )
            path = f
        state = ckpt.read_weight_file(path)
        return cls.from_released_state_dict(state, llm, torch_dtype, config, source=str(path))

    @classmethod
    def from_released_state_dict(
        cls,
        state: dict[str, Tensor],
        llm: str | Path | None,
        torch_dtype: torch.dtype | None = None,
        config: SlideChatConfig | None = None,
        source: str = "checkpoint",
    ) -> "SlideChat":
        """Build from a state dict in the original key layout; every key must be used, none missing."""
        groups: dict[str, dict[str, Tensor]] = {"LongNet_encoder.": {}, "projector.": {}, "llm.": {}}
        other = []
        for k, v in state.items():
            for prefix, g in groups.items():
                if k.startswith(prefix):
                    g[k[len(prefix):]] = v
                    break
            else:
                other.append(k)
        if other:
            raise KeyError(f"{source}: unexpected keys outside LongNet_encoder./projector./llm.: {sorted(other)[:20]}")
        return cls._assemble(groups["LongNet_encoder."], groups["projector."], groups["llm."], llm, torch_dtype,
                             config, source, llm_dir_with_weights=None)

    @classmethod
    def _from_xtuner_dir(cls, path: Path, llm: str | Path | None, torch_dtype: torch.dtype | None,
                         config: SlideChatConfig | None) -> "SlideChat":
        from slidechat import checkpoint as ckpt

        enc = ckpt.read_weight_dir(path / "LongNet_encoder")
        enc = {k[len("LongNet_encoder."):] if k.startswith("LongNet_encoder.") else k: v for k, v in enc.items()}
        proj = ckpt.read_weight_dir(path / "projector")
        proj = {k[len("projector."):] if k.startswith("projector.") else k: v for k, v in proj.items()}
        adapter = path / "llm_adapter"
        has_llm = (path / "config.json").is_file() and any(
            p.suffix in (".safetensors", ".bin") for p in path.iterdir() if p.is_file()
        )
        llm_dir = path if has_llm else None
        model = cls._assemble(enc, proj, {}, llm if not has_llm else path, torch_dtype, config, str(path),
                              llm_dir_with_weights=llm_dir)
        if adapter.is_dir():
            from peft import PeftModel

            model.llm = PeftModel.from_pretrained(model.llm, str(adapter))
            model.llm_weights_loaded = True
        return model

    @classmethod
    def _assemble(
        cls,
        enc: dict[str, Tensor],
        proj: dict[str, Tensor],
        llm_weights: dict[str, Tensor],
        llm: str | Path | None,
        torch_dtype: torch.dtype | None,
        config: SlideChatConfig | None,
        source: str,
        llm_dir_with_weights: Path | None,
    ) -> "SlideChat":
        if not enc or not proj:
            raise KeyError(f"{source}: no {'LongNet_encoder' if not enc else 'projector'} weights found")
        cfg = SlideChatConfig(**{**(config.to_dict() if config else {}), "llm_hidden_size": None})
        # layer sizes from the weights; heads cannot be read off the weights (config, default 8)
        try:
            cfg.feature_dim = int(proj["model.0.weight"].shape[1])
            cfg.encoder_ffn_dim = int(enc["layers.0.ffn.fc1.weight"].shape[0])
        except KeyError as e:
            raise KeyError(f"{source}: missing key {e} in the original layout") from None
        cfg.encoder_layers = len({k.split(".")[1] for k in enc if k.startswith("layers.")})
        cfg.context = "per_patch"  # what the released weights were trained with
        base = _require_dir(llm, "Hugging Face causal LM directory (the base LLM, e.g. Qwen2.5-7B-Instruct)")
        if llm_weights:
            llm_module = _llm_from_state_dict(base, llm_weights, torch_dtype)
        else:
            llm_module = _load_llm(base, torch_dtype)
        model = cls(llm_module, _load_tokenizer(base), cfg, llm_source=str(base))
        model.llm_weights_loaded = bool(llm_weights) or llm_dir_with_weights is not None
        if not model.llm_weights_loaded:
            log.info("%s holds no LLM weights (stage-1 checkpoint); the LLM is the base model at %s", source, base)
        _load_strict(model.LongNet_encoder, enc, f"{source} (LongNet_encoder.)")
        _load_strict(model.projector, proj, f"{source} (projector.)")
        if torch_dtype is not None:
            model.LongNet_encoder.to(torch_dtype)
            model.projector.to(torch_dtype)
        return model.eval()

    @classmethod
    def _from_our_dir(cls, path: Path, llm: str | Path | None, torch_dtype: torch.dtype | None) -> "SlideChat":
        from safetensors.torch import load_file

        meta = json.loads((path / CONFIG_FILE).read_text())
        cfg = SlideChatConfig.from_dict(meta["config"])
        fmt = meta.get("llm_format", "full")
        if fmt == "full":
            base = path / LLM_SUBDIR
            llm_module = _load_llm(base, torch_dtype)
            tok_dir = base
        else:
            base = _require_dir(llm or meta.get("llm_source"), "base LLM directory this checkpoint was trained from")
            llm_module = _load_llm(base, torch_dtype)
            tok_dir = path / TOKENIZER_SUBDIR if (path / TOKENIZER_SUBDIR).is_dir() else base
            if fmt == "peft_adapter":
                from peft import PeftModel

                llm_module = PeftModel.from_pretrained(llm_module, str(path / ADAPTER_SUBDIR))
            elif fmt != "base":
                raise ValueError(f"{path / CONFIG_FILE}: unknown llm_format {fmt!r}")
        model = cls(llm_module, _load_tokenizer(tok_dir), cfg, llm_source=meta.get("llm_source"))
        if fmt == "base":
            model.llm_weights_loaded = False
        state = load_file(str(path / VISUAL_WEIGHTS_FILE))
        _load_strict(model, state, str(path / VISUAL_WEIGHTS_FILE), prefixes=("LongNet_encoder.", "projector."))
        if torch_dtype is not None:
            model.LongNet_encoder.to(torch_dtype)
            model.projector.to(torch_dtype)
        return model.eval()

    def save_pretrained(self, out_dir: str | Path, save_llm: bool = True) -> Path:
        """Write the model directory atomically.

        `slidechat_config.json` (config + how to find the LLM), `slide_encoder.safetensors`
        (`LongNet_encoder.*`, `projector.*`), and the LLM: `llm/` (full weights + tokenizer),
        `llm_adapter/` + `tokenizer/` for a PEFT model, or with `save_llm=False` only a reference
        to the base LLM directory (for a frozen LLM).
        """
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        is_peft = hasattr(self.llm, "peft_config")
        fmt = "peft_adapter" if is_peft else ("full" if save_llm else "base")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if k.startswith(("LongNet_encoder.", "projector."))}
        with atomic_path(out_dir, is_dir=True) as tmp:
            save_file(state, str(tmp / VISUAL_WEIGHTS_FILE))
            if fmt == "full":
                self.llm.save_pretrained(tmp / LLM_SUBDIR)
                self.tokenizer.save_pretrained(tmp / LLM_SUBDIR)
            else:
                if is_peft:
                    self.llm.save_pretrained(tmp / ADAPTER_SUBDIR)
                self.tokenizer.save_pretrained(tmp / TOKENIZER_SUBDIR)
            write_json(tmp / CONFIG_FILE, {
                "format_version": FORMAT_VERSION,
                "model_type": "slidechat",
                "llm_format": fmt,
                "llm_source": self.llm_source,
                "config": self.config.to_dict(),
            })
        return out_dir

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
        keep = select_patches(x.shape[0], cap)
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
        (right-padded, position ids restarting per sample) goes to the LLM; returns its output
        (`.loss`, `.logits`; logits follow the expanded sequence).
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
        return self.llm(inputs_embeds=inputs, attention_mask=att, position_ids=pos, labels=lab_out, **llm_kwargs)

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


def _load_strict(module: nn.Module, state: dict[str, Tensor], source: str,
                 prefixes: tuple[str, ...] | None = None) -> None:
    """Load `state` into `module`; every key used and none missing, else a KeyError listing them."""
    expected = module.state_dict()
    if prefixes is not None:
        expected = {k: v for k, v in expected.items() if k.startswith(prefixes)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        if bad_shape:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in bad_shape[:10]))
        raise KeyError(f"{source}: checkpoint does not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=False)
