"""Reading SlideChat checkpoints safely, and `slidechat convert-checkpoint`.

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
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

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

    from slidechat.model import SlideChat, SlideChatConfig

    dtype = None if a.dtype == "keep" else getattr(torch, a.dtype)
    config = SlideChatConfig(encoder_heads=a.num_heads) if a.num_heads else None
    try:
        model = SlideChat.from_pretrained(a.src, llm=a.llm, torch_dtype=dtype, config=config)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}")
        return 1
    model.save_pretrained(a.dst, save_llm=model.llm_weights_loaded)
    print(a.dst)
    return 0
