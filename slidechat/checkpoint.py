"""Reading and writing SlideChat model directories (the only slidechat module that does), `slidechat convert-checkpoint`.

Released SlideChat weights are raw DeepSpeed folders (`stage2_pth/mp_rank_00_model_states.pt`,
weights under the `module` key, keys `LongNet_encoder.*`, `projector.model.{0,2}.*`, `llm.*`).
Those files also pickle mmengine objects (message hub, history buffers, config dicts). Every torch file
is read by `wsicore.torchfile.read_torch_file` (weights only; mmengine objects become inert stubs
without importing mmengine; anything that could run code is refused), every state dict is loaded with
`wsicore.torchfile.load_strict`. `convert-checkpoint` writes our safetensors directory once, so later
loads never unpickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slidechat.model import SlideChat, SlideChatConfig
from wsicore.cli import command_parser
from wsicore.errors import InputError
from wsicore.files import atomic_path, write_json
from wsicore.torchfile import load_strict, read_safetensors, read_state_dict

log = logging.getLogger(__name__)


class MissingCheckpointError(InputError, FileNotFoundError):
    """A checkpoint, model directory or LLM directory that is not there (or holds no weights)."""


DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
        raise InputError(
            f"{folder} holds several DeepSpeed checkpoints ({', '.join(str(p.parent.name) for p in below)}); "
            "pass the one to load"
        )
    return None


def weights_digest(path: str | Path, head_bytes: int | None = 1 << 20) -> str | None:
    """A cheap identity of the weights in a file or folder (its weight files, not sub-folders): sha256 over each
    file's name, size and first `head_bytes` (None: all). Two checkpoints of one architecture differ there
    (the data right after the header), a copy moved elsewhere does not. None when there is no weight file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    else:
        files = []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(-1 if head_bytes is None else head_bytes))
    return h.hexdigest()


def read_weight_dir(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the weight files in a folder (HF `save_pretrained` style, possibly sharded)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    safet = [p for p in files if p.suffix == ".safetensors"]
    files = safet or files  # prefer safetensors when both were saved
    if not files:
        raise MissingCheckpointError(f"no weight files (*.safetensors, *.bin, *.pt, *.pth) in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_state_dict(f))
    return sd


# ----------------------------------------------------------------------------------------------
# SlideChat model directories: ours (read and written), released DeepSpeed / .pth / xtuner (read)

CONFIG_FILE = "slidechat_config.json"
VISUAL_WEIGHTS_FILE = "slide_encoder.safetensors"


def model_digest(path: str | Path) -> str | None:
    """Identity of a model (for resuming only what it made): all of our directory's slide encoder + projector
    file (small, and trained in both stages), or the head of a released checkpoint's weights."""
    visual = Path(path) / VISUAL_WEIGHTS_FILE
    return weights_digest(visual, head_bytes=None) if visual.is_file() else weights_digest(path)
LLM_SUBDIR = "llm"
ADAPTER_SUBDIR = "llm_adapter"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT_VERSION = 1


def _require_dir(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise MissingCheckpointError(f"no LLM directory given: pass --llm DIR, a local {what}",
                                     config_hint="set `llm.path`")
    p = Path(path)
    if not p.is_dir():
        raise MissingCheckpointError(f"LLM directory not found: {p}; pass --llm DIR, a local {what}",
                                     config_hint="set `llm.path`")
    return p


def _not_an_llm(path: Path, exc: Exception) -> MissingCheckpointError:
    return MissingCheckpointError(f"{path}: not a Hugging Face causal LM directory with its tokenizer "
                                  f"({type(exc).__name__}: {exc}); pass --llm DIR, a local model directory",
                                  config_hint="set `llm.path`")


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_an_llm(path, exc) from exc


def _load_llm(path: Path, torch_dtype: torch.dtype | None) -> nn.Module:
    """The causal LM of a Hugging Face directory. Transformers reads safetensors only: pickled weights
    (`pytorch_model*.bin`, older saves) are read by our weights-only reader, never unpickled by transformers,
    and code in the directory (`auto_map`) never runs."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # a log file gets no progress bar of the weight loading
        hf_logging.disable_progress_bar()
    pickled = sorted(path.glob("pytorch_model*.bin"))
    if pickled and not any(path.glob("*.safetensors")):
        weights: dict[str, Tensor] = {}
        for f in pickled:
            weights.update(read_state_dict(f))
        return _llm_from_state_dict(path, weights, torch_dtype, str(path))
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "trust_remote_code": False}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        llm, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except OSError as exc:  # no config.json or no weights
        raise _not_an_llm(path, exc) from exc
    except ValueError as exc:  # an architecture transformers does not have (e.g. one that needs remote code)
        raise InputError(f"{path}: its model cannot be built by this transformers version, and code shipped with "
                         f"a model is never run ({exc}); pass --llm DIR, a local Hugging Face causal LM directory",
                         config_hint="set `llm.path`") from exc
    # transformers fills weights missing from the files with random values and only logs it
    problems = [f"{what} ({len(keys)}): {', '.join(map(str, sorted(keys)[:8]))}" for what, keys in
                (("missing", info.get("missing_keys") or []), ("of another shape", info.get("mismatched_keys") or []))
                if keys]
    if problems:
        raise InputError(f"{path}: the weight files do not fill the model its config.json describes; "
                         + "; ".join(problems))
    return llm


def _load_adapter(llm: nn.Module, adapter: Path) -> nn.Module:
    """`llm` with the PEFT adapter of the folder `adapter`, strictly: its weights must be safetensors (peft
    would unpickle adapter_model.bin itself) and fill every adapter weight (peft leaves missing ones at
    their initial values, a LoRA B of zeros: silently the base model, with a warning)."""
    from peft import PeftModel, get_peft_model_state_dict

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(f"{adapter}: no adapter_model.safetensors (a pickled adapter_model.bin is not read); save "
                         "the adapter with peft's save_pretrained(safe_serialization=True)")
    model = PeftModel.from_pretrained(llm, str(adapter))
    missing = sorted(set(get_peft_model_state_dict(model)) - set(read_safetensors(weights)))
    if missing:
        raise InputError(f"{weights}: the adapter weights do not fill the adapter its config describes; missing "
                         f"({len(missing)}): {', '.join(missing[:8])}")
    return model


def _llm_from_state_dict(path: Path, weights: dict[str, Tensor], torch_dtype: torch.dtype | None,
                         source: str) -> nn.Module:
    """Build the LLM of `path`'s config and fill it strictly from `weights` (no base weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: no usable config.json for the LLM ({exc})") from exc
    with init_empty_weights(include_buffers=False):
        llm = AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False))
    if torch_dtype is not None:
        weights = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in weights.items()}
    load_strict(llm, weights, f"{source} (llm., the LLM architecture of {path})",
                allow_missing=("lm_head.weight",) if tied else ())
    if "lm_head.weight" not in weights and tied:
        llm.tie_weights()
    left = [n for n, p in llm.named_parameters() if p.device.type == "meta"]
    if left:
        raise InputError(f"{source}: LLM parameters not filled from the checkpoint: {left[:10]}")
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
    kind = model_layout(path, "checkpoint", None)
    if kind == "ours":
        return _load_our_dir(path, llm, torch_dtype)
    if kind == "xtuner":
        return _load_xtuner_dir(path, llm, torch_dtype, config)
    if kind == "deepspeed":
        path = find_deepspeed_model_file(path)
    state = read_state_dict(path)
    return model_from_released_state_dict(state, llm, torch_dtype, config, source=str(path))


def model_layout(path: str | Path, what: str = "model", flag: str | None = "--model") -> str:
    """Which model layout `path` holds ("ours", "xtuner", "deepspeed", or "file" for a .pt/.pth/.safetensors);
    anything else is a MissingCheckpointError naming the path (checked before slow work, reading no weights)."""
    path = Path(path)
    where = f" (option {flag})" if flag else ""
    if not path.exists():
        raise MissingCheckpointError(f"{what} not found: {path}{where}")
    if not path.is_dir():
        return "file"
    if (path / CONFIG_FILE).is_file():
        return "ours"
    if (path / "LongNet_encoder").is_dir() and (path / "projector").is_dir():
        return "xtuner"
    if find_deepspeed_model_file(path) is not None:
        return "deepspeed"
    raise MissingCheckpointError(
        f"{path} is neither our model directory ({CONFIG_FILE}), an xtuner folder (LongNet_encoder/, projector/) "
        f"nor a DeepSpeed folder ({DEEPSPEED_MODEL_FILE}){where}"
    )


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
        raise InputError(f"{source}: unexpected keys outside LongNet_encoder./projector./llm.: {sorted(other)[:20]}")
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
        model.llm = _load_adapter(model.llm, adapter)
        model.llm_weights_loaded = True
    return model


def _assemble(enc: dict[str, Tensor], proj: dict[str, Tensor], llm_weights: dict[str, Tensor],
              llm: str | Path | None, torch_dtype: torch.dtype | None, config: SlideChatConfig | None,
              source: str, llm_dir_with_weights: Path | None) -> SlideChat:
    if not enc or not proj:
        raise InputError(f"{source}: no {'LongNet_encoder' if not enc else 'projector'} weights found")
    cfg = SlideChatConfig(**{**(config.to_dict() if config else {}), "llm_hidden_size": None})
    # layer sizes from the weights; heads cannot be read off the weights (config, default 8)
    try:
        cfg.feature_dim = int(proj["model.0.weight"].shape[1])
        cfg.encoder_ffn_dim = int(enc["layers.0.ffn.fc1.weight"].shape[0])
    except KeyError as e:
        raise InputError(f"{source}: missing key {e} in the original layout") from None
    cfg.encoder_layers = len({k.split(".")[1] for k in enc if k.startswith("layers.")})
    cfg.context = "per_patch"  # what the released weights were trained with
    try:  # sizes read off the weights are checked as a config's are, before anything is built
        cfg = SlideChatConfig.from_dict(cfg.to_dict())
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: the weights describe no SlideChat model this code builds ({e}; "
                         f"encoder_layers {cfg.encoder_layers}, feature_dim {cfg.feature_dim}, encoder_ffn_dim "
                         f"{cfg.encoder_ffn_dim})") from e
    base = _require_dir(llm, "Hugging Face causal LM directory (the base LLM, e.g. Qwen2.5-7B-Instruct)")
    if llm_weights:
        llm_module = _llm_from_state_dict(base, llm_weights, torch_dtype, source)
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
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        cfg = SlideChatConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path / CONFIG_FILE}: not a SlideChat model config ({type(e).__name__}: {e})") from e
    fmt = meta.get("llm_format", "full")
    if fmt == "full":
        if llm:
            log.warning("%s holds its own LLM (%s/); --llm %s is not used", path, LLM_SUBDIR, llm)
        base = path / LLM_SUBDIR
        llm_module = _load_llm(base, torch_dtype)
        tok_dir = base
    else:
        base = _require_dir(llm or meta.get("llm_source"), "base LLM directory this checkpoint was trained from")
        recorded = meta.get("llm_digest")
        if recorded and weights_digest(base) != recorded:  # same shapes load fine and answer nonsense
            raise InputError(f"{path} was trained on the LLM in {meta.get('llm_source')}, but {base} holds other "
                             "weights: pass that LLM with --llm (if it is the same LLM saved again, remove "
                             f"\"llm_digest\" from {path / CONFIG_FILE})")
        llm_module = _load_llm(base, torch_dtype)
        tok_dir = path / TOKENIZER_SUBDIR if (path / TOKENIZER_SUBDIR).is_dir() else base
        if fmt == "peft_adapter":
            llm_module = _load_adapter(llm_module, path / ADAPTER_SUBDIR)
        elif fmt != "base":
            raise InputError(f"{path / CONFIG_FILE}: unknown llm_format {fmt!r}")
    model = SlideChat(llm_module, _load_tokenizer(tok_dir), cfg, llm_source=meta.get("llm_source"))
    if fmt == "base":
        model.llm_weights_loaded = False
    state = read_safetensors(path / VISUAL_WEIGHTS_FILE)
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
    with atomic_path(out_dir, is_dir=True, replaces=CONFIG_FILE) as tmp:
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
            # the base LLM's identity, checked when a model without LLM weights is loaded on one
            "llm_digest": weights_digest(model.llm_source) if fmt != "full" and model.llm_source else None,
            "config": model.config.to_dict(),
        })
    return out_dir


# ----------------------------------------------------------------------------------------------
# CLI


def convert_main(argv: list[str]) -> int:
    """`slidechat convert-checkpoint SRC DST [--llm DIR] [--dtype ...] [--num-heads N]`."""
    p = command_parser(
        "slidechat convert-checkpoint",
        "Convert a SlideChat checkpoint (DeepSpeed folder, .pt/.pth file, xtuner save_pretrained folder) into "
        "our safetensors model directory, loaded strictly.",
        "slidechat convert-checkpoint SlideChat/stage2_pth models/slidechat --llm /models/Qwen2.5-7B-Instruct",
    )
    p.add_argument("src", help="released SlideChat folder (e.g. stage2_pth/), .pt/.pth file, or xtuner folder")
    p.add_argument("dst", help="output model directory")
    p.add_argument("--llm", default=None, help="base LLM directory (config + tokenizer; e.g. Qwen2.5-7B-Instruct)")
    p.add_argument("--dtype", choices=["keep", "float32", "float16", "bfloat16"], default="keep",
                   help="dtype of the saved weights (keep: as stored)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="LongNet attention heads (not recoverable from the weights; unset: 8)")
    a = p.parse_args(argv)
    config = SlideChatConfig(encoder_heads=a.num_heads) if a.num_heads else None
    model = load_model(a.src, llm=a.llm, torch_dtype=None if a.dtype == "keep" else getattr(torch, a.dtype),
                       config=config)
    print(save_model(model, a.dst, save_llm=model.llm_weights_loaded))
    return 0
