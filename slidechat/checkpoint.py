"""Reading and writing SlideChat checkpoints (the only module that does), and `slidechat convert-checkpoint`.

Released SlideChat weights are raw DeepSpeed folders (`stage2_pth/mp_rank_00_model_states.pt`,
weights under the `module` key, keys `LongNet_encoder.*`, `projector.model.{0,2}.*`, `llm.*`).
Those files also pickle mmengine objects (message hub, history buffers, config dicts). They are
read here with a restricted unpickler: tensors, storages, containers and a few numpy/builtin
types are rebuilt, every other global is replaced by an inert stub *without importing its
module*, so neither mmengine nor arbitrary code is needed or run. `convert-checkpoint` writes
our safetensors directory once, so later loads never unpickle.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slidechat.model import SlideChat, SlideChatConfig
from wsicore.files import atomic_path, write_json

log = logging.getLogger(__name__)

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# ----------------------------------------------------------------------------------------------
# restricted unpickling


class StubObject(dict):
    """Stand-in for an object of a class that was not imported; keeps whatever state was pickled."""

    _stub_module = "?"
    _stub_name = "?"

    stub_args: tuple = ()
    stub_state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.stub_args = args

    def __setstate__(self, state: Any) -> None:
        self.stub_state = state

    def append(self, item: Any) -> None:  # for pickled list subclasses
        self.__dict__.setdefault("stub_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("stub_items", []).extend(items)

    def __repr__(self) -> str:
        return f"<stub {self._stub_module}.{self._stub_name}>"

    def __reduce__(self):  # a stub is never written back as if it were the real thing
        raise pickle.PicklingError(f"cannot pickle stub of {self._stub_module}.{self._stub_name}")


_STUBS: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (StubObject,), {"_stub_module": module, "_stub_name": name, "__module__": "stub." + module})
    return _STUBS[key]


def _allowed_globals() -> dict[str, Any]:
    """Globals that may be resolved for real: PyTorch's weights-only allow-list plus a few safe extras."""
    import collections

    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed.update(
        {
            "collections.OrderedDict": collections.OrderedDict,
            "collections.defaultdict": collections.defaultdict,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "builtins.slice": slice,
            "builtins.complex": complex,
            "builtins.range": range,
            "torch.device": torch.device,
        }
    )
    # numpy arrays and scalars (their reductions only rebuild data)
    import numpy as np
    from numpy._core import multiarray

    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{mod}._reconstruct"] = multiarray._reconstruct
        allowed[f"{mod}.scalar"] = multiarray.scalar
    allowed["numpy.dtype"] = np.dtype
    allowed["numpy.ndarray"] = np.ndarray
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    stubbed: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        allowed = _allowed_globals_cache()
        if full in allowed:
            return allowed[full]
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        # Unknown: stub it; never import `module`.
        _RestrictedUnpickler.stubbed.add(full)
        return _stub_class(module, name)


_ALLOWED: dict[str, Any] | None = None


def _allowed_globals_cache() -> dict[str, Any]:
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _allowed_globals()
    return _ALLOWED


class _RestrictedPickleModule:
    """A `pickle_module` for `torch.load` whose Unpickler stubs unknown globals."""

    Unpickler = _RestrictedUnpickler
    load = pickle.load
    __name__ = "slidechat_restricted_pickle"


def restricted_torch_load(path: str | Path) -> Any:
    """`torch.load` a checkpoint on CPU, stubbing every class outside a small allow-list.

    Memory-maps zip-format files so a 15 GB checkpoint is not read into memory twice.
    """
    path = Path(path)
    _RestrictedUnpickler.stubbed = set()
    mmap = zipfile.is_zipfile(path)
    obj = torch.load(
        path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=_RestrictedPickleModule
    )
    if _RestrictedUnpickler.stubbed:
        log.info("stubbed %d unknown classes in %s: %s", len(_RestrictedUnpickler.stubbed), path,
                 ", ".join(sorted(_RestrictedUnpickler.stubbed)))
    return obj


def stubbed_classes() -> set[str]:
    """Classes replaced by stubs during the last `restricted_torch_load`."""
    return set(_RestrictedUnpickler.stubbed)


# ----------------------------------------------------------------------------------------------
# locating and reading state dicts


def find_deepspeed_model_file(folder: Path) -> Path | None:
    """`<folder>/mp_rank_00_model_states.pt`, the one named by `<folder>/latest`, or the only one a level below."""
    direct = folder / DEEPSPEED_MODEL_FILE
    if direct.is_file():
        return direct
    latest = folder / "latest"  # DeepSpeed's pointer to the newest `global_step*` tag
    if latest.is_file() and (folder / latest.read_text().strip() / DEEPSPEED_MODEL_FILE).is_file():
        return folder / latest.read_text().strip() / DEEPSPEED_MODEL_FILE
    below = sorted(folder.glob(f"*/{DEEPSPEED_MODEL_FILE}"))
    if len(below) == 1:
        return below[0]
    if len(below) > 1:
        raise ValueError(
            f"{folder} holds several DeepSpeed checkpoints ({', '.join(str(p.parent.name) for p in below)}); "
            "pass the one to load"
        )
    return None


def _is_tensor_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) for k in d) and all(
        isinstance(v, torch.Tensor) for v in d.values()
    )


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint: under `module`, `state_dict`, `model`, or the dict itself."""
    if _is_tensor_dict(obj):
        sd = obj
    else:
        sd = None
        if isinstance(obj, dict):
            for key in ("module", "state_dict", "model"):
                inner = obj.get(key)
                if _is_tensor_dict(inner):
                    sd = inner
                    break
                if isinstance(inner, dict) and key == "module" and not inner:
                    raise ValueError(
                        f"{source}: the DeepSpeed `module` entry is empty (a ZeRO-3 checkpoint keeps its weights "
                        "in the optimizer shards); consolidate it with DeepSpeed's zero_to_fp32.py first"
                    )
        if sd is None:
            keys = list(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{source}: no state dict found (looked for 'module', 'state_dict', 'model'); top level: {keys}")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):  # DDP wrapper prefix
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of one weight file: safetensors directly, torch pickles through the restricted loader."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return extract_state_dict(restricted_torch_load(path), str(path))


def read_weight_dir(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the weight files in a folder (HF `save_pretrained` style, possibly sharded)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    safet = [p for p in files if p.suffix == ".safetensors"]
    files = safet or files  # prefer safetensors when both were saved
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.pt, *.pth) in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_weight_file(f))
    return sd


# ----------------------------------------------------------------------------------------------
# SlideChat model directories: ours (read and written), released DeepSpeed / .pth / xtuner (read)

CONFIG_FILE = "slidechat_config.json"
VISUAL_WEIGHTS_FILE = "slide_encoder.safetensors"
LLM_SUBDIR = "llm"
ADAPTER_SUBDIR = "llm_adapter"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT_VERSION = 1


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


def new_model(llm_dir: str | Path, config: SlideChatConfig | None = None,
              torch_dtype: torch.dtype | None = None) -> SlideChat:
    """A new model: fresh slide encoder + projector (fp32), the LLM and tokenizer from a local directory."""
    path = _require_dir(llm_dir, "Hugging Face causal LM directory")
    model = SlideChat(_load_llm(path, torch_dtype), _load_tokenizer(path), config or SlideChatConfig(),
                      llm_source=str(path))
    return model.eval()


def load_model(path: str | Path, llm: str | Path | None = None, torch_dtype: torch.dtype | None = None,
               config: SlideChatConfig | None = None) -> SlideChat:
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
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return _load_our_dir(path, llm, torch_dtype)
    if path.is_dir() and (path / "LongNet_encoder").is_dir() and (path / "projector").is_dir():
        return _load_xtuner_dir(path, llm, torch_dtype, config)
    if path.is_dir():
        f = find_deepspeed_model_file(path)
        if f is None:
            raise FileNotFoundError(
                f"{path} is neither our model directory ({CONFIG_FILE}), an xtuner folder "
                f"(LongNet_encoder/, projector/) nor a DeepSpeed folder ({DEEPSPEED_MODEL_FILE})"
            )
        path = f
    state = read_weight_file(path)
    return model_from_released_state_dict(state, llm, torch_dtype, config, source=str(path))


def model_from_released_state_dict(state: dict[str, Tensor], llm: str | Path | None,
                                   torch_dtype: torch.dtype | None = None, config: SlideChatConfig | None = None,
                                   source: str = "checkpoint") -> SlideChat:
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
    return _assemble(groups["LongNet_encoder."], groups["projector."], groups["llm."], llm, torch_dtype,
                     config, source, llm_dir_with_weights=None)


def _load_xtuner_dir(path: Path, llm: str | Path | None, torch_dtype: torch.dtype | None,
                     config: SlideChatConfig | None) -> SlideChat:
    enc = read_weight_dir(path / "LongNet_encoder")
    enc = {k[len("LongNet_encoder."):] if k.startswith("LongNet_encoder.") else k: v for k, v in enc.items()}
    proj = read_weight_dir(path / "projector")
    proj = {k[len("projector."):] if k.startswith("projector.") else k: v for k, v in proj.items()}
    adapter = path / "llm_adapter"
    has_llm = (path / "config.json").is_file() and any(
        p.suffix in (".safetensors", ".bin") for p in path.iterdir() if p.is_file()
    )
    llm_dir = path if has_llm else None
    model = _assemble(enc, proj, {}, llm if not has_llm else path, torch_dtype, config, str(path),
                      llm_dir_with_weights=llm_dir)
    if adapter.is_dir():
        from peft import PeftModel

        model.llm = PeftModel.from_pretrained(model.llm, str(adapter))
        model.llm_weights_loaded = True
    return model


def _assemble(enc: dict[str, Tensor], proj: dict[str, Tensor], llm_weights: dict[str, Tensor],
              llm: str | Path | None, torch_dtype: torch.dtype | None, config: SlideChatConfig | None,
              source: str, llm_dir_with_weights: Path | None) -> SlideChat:
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
    model = SlideChat(llm_module, _load_tokenizer(base), cfg, llm_source=str(base))
    model.llm_weights_loaded = bool(llm_weights) or llm_dir_with_weights is not None
    if not model.llm_weights_loaded:
        log.info("%s holds no LLM weights (stage-1 checkpoint); the LLM is the base model at %s", source, base)
    load_strict(model.LongNet_encoder, enc, f"{source} (LongNet_encoder.)")
    load_strict(model.projector, proj, f"{source} (projector.)")
    if torch_dtype is not None:
        model.LongNet_encoder.to(torch_dtype)
        model.projector.to(torch_dtype)
    return model.eval()


def _load_our_dir(path: Path, llm: str | Path | None, torch_dtype: torch.dtype | None) -> SlideChat:
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
    model = SlideChat(llm_module, _load_tokenizer(tok_dir), cfg, llm_source=meta.get("llm_source"))
    if fmt == "base":
        model.llm_weights_loaded = False
    state = load_file(str(path / VISUAL_WEIGHTS_FILE))
    load_strict(model, state, str(path / VISUAL_WEIGHTS_FILE), prefixes=("LongNet_encoder.", "projector."))
    if torch_dtype is not None:
        model.LongNet_encoder.to(torch_dtype)
        model.projector.to(torch_dtype)
    return model.eval()


def save_model(model: SlideChat, out_dir: str | Path, save_llm: bool = True) -> Path:
    """Write the model directory atomically.

    `slidechat_config.json` (config + how to find the LLM), `slide_encoder.safetensors`
    (`LongNet_encoder.*`, `projector.*`), and the LLM: `llm/` (full weights + tokenizer),
    `llm_adapter/` + `tokenizer/` for a PEFT model, or with `save_llm=False` only a reference
    to the base LLM directory (for a frozen LLM).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    is_peft = hasattr(model.llm, "peft_config")
    fmt = "peft_adapter" if is_peft else ("full" if save_llm else "base")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k.startswith(("LongNet_encoder.", "projector."))}
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_file(state, str(tmp / VISUAL_WEIGHTS_FILE))
        if fmt == "full":
            model.llm.save_pretrained(tmp / LLM_SUBDIR)
            model.tokenizer.save_pretrained(tmp / LLM_SUBDIR)
        else:
            if is_peft:
                model.llm.save_pretrained(tmp / ADAPTER_SUBDIR)
            model.tokenizer.save_pretrained(tmp / TOKENIZER_SUBDIR)
        write_json(tmp / CONFIG_FILE, {
            "format_version": FORMAT_VERSION,
            "model_type": "slidechat",
            "llm_format": fmt,
            "llm_source": model.llm_source,
            "config": model.config.to_dict(),
        })
    return out_dir


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str,
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


# ----------------------------------------------------------------------------------------------
# CLI


def convert_main(argv: list[str]) -> int:
    """`slidechat convert-checkpoint SRC DST [--llm DIR] [--dtype ...]`."""
    p = argparse.ArgumentParser(
        prog="slidechat convert-checkpoint",
        description="Convert a SlideChat checkpoint (DeepSpeed folder, .pt/.pth file, xtuner save_pretrained "
        "folder) into our safetensors model directory, loaded strictly.",
    )
    p.add_argument("src", help="released SlideChat folder (e.g. stage2_pth/), .pt/.pth file, or xtuner folder")
    p.add_argument("dst", help="output model directory")
    p.add_argument("--llm", default=None, help="base LLM directory (config + tokenizer; e.g. Qwen2.5-7B-Instruct)")
    p.add_argument("--dtype", choices=["keep", "float32", "float16", "bfloat16"], default="keep",
                   help="dtype of the saved weights (default: as stored)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="LongNet attention heads (not recoverable from weights; default 8)")
    a = p.parse_args(argv)

    dtype = None if a.dtype == "keep" else getattr(torch, a.dtype)
    config = SlideChatConfig(encoder_heads=a.num_heads) if a.num_heads else None
    try:
        model = load_model(a.src, llm=a.llm, torch_dtype=dtype, config=config)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}")
        return 1
    save_model(model, a.dst, save_llm=model.llm_weights_loaded)
    print(a.dst)
    return 0
