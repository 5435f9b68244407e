"""One-command inference on a new slide: segmentation -> tiling -> feature extraction -> SlideChat.

``slidechat ask --slide S.svs --question "..." [--model DIR] [--llm DIR]`` prints the answer;
``slidechat chat --slide S.svs ...`` keeps a multi-turn conversation on stdin/stdout (the slide is encoded
once; /reset starts over, /exit or Ctrl-D leaves). Intermediate outputs are cached per slide in ``--work-dir``
(default ``~/.cache/wsi-slidechat/<slide_id>/``) and reused: the tissue mask, the patch coordinates and the feature
store (the extractor itself checks that a store matches the encoder and coordinates).

The patch encoder comes from ``--encoder`` / ``--encoder-checkpoint`` / ``--transform``; when not given, the
model directory's JSON files are read for the keys ``feature_encoder``, ``feature_transform``,
``feature_target_mpp`` and ``feature_patch_size`` (top level, or ``encoder``... under ``features``), then
the attributes of a feature store named by its ``training_config.json`` (``data`` records or
``features_dir``), else ``conch_v1`` (which needs ``--encoder-checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from slidechat.model_card import demo_notice
from slidechat.template import IMAGE_TOKEN
from wsicore.cli import command_parser
from wsicore.errors import InputError, UsageError
from wsicore.files import input_file, output_folder, write_json

DEFAULT_CACHE = Path(os.environ.get("WSI_SLIDECHAT_CACHE", Path.home() / ".cache" / "wsi-slidechat"))
MODEL_ENV = "SLIDECHAT_MODEL"  # the default of --model (SLIDECHAT_CHECKPOINT, its earlier name, is read too)


@dataclass
class FeatureSettings:
    """How a slide becomes a feature store (must match what the model was trained on)."""

    encoder: str = "conch_v1"
    encoder_checkpoint: str | None = None
    transform: str | None = None
    target_mpp: float = 0.5
    patch_size: int = 224
    min_tissue_fraction: float = 0.5
    seg_preset: str | None = None
    batch_size: int = 64
    num_workers: int = 0  # one slide: read patches in this process (no reader processes to start)


def model_feature_config(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Feature settings recorded in a model directory's JSON configs (keys ``feature_*``), if any."""
    out: dict[str, Any] = {}
    if not model_dir or not Path(model_dir).is_dir():
        return out
    for cfg in sorted(Path(model_dir).glob("*.json")):
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for src in (data, data.get("features") if isinstance(data.get("features"), dict) else {}):
            for key in ("feature_encoder", "feature_transform", "feature_target_mpp", "feature_patch_size"):
                if key in src and src[key] is not None and key not in out:
                    out[key] = src[key]
            for short, key in (("encoder", "feature_encoder"), ("transform", "feature_transform"),
                               ("target_mpp", "feature_target_mpp"), ("patch_size", "feature_patch_size")):
                if src is not data and short in src and key not in out:
                    out[key] = src[short]
    if "feature_encoder" not in out:
        out.update({k: v for k, v in _features_from_training(Path(model_dir)).items() if k not in out})
    return out


def _features_from_training(model_dir: Path) -> dict[str, Any]:
    """Fallback: the attributes of a feature store the model was trained on (via training_config.json)."""
    from preprocessing.stores import read_store_attrs

    try:
        cfg = json.loads((model_dir / "training_config.json").read_text())
        stores: list[Path] = []
        if cfg.get("data") and Path(cfg["data"]).is_file():
            records = json.loads(Path(cfg["data"]).read_text())
            stores = [Path(r["features"]) for r in records[:1] if isinstance(r, dict) and r.get("features")]
        if not stores and cfg.get("features_dir") and Path(cfg["features_dir"]).is_dir():
            stores = sorted(p for p in Path(cfg["features_dir"]).iterdir() if p.suffix in (".zarr", ".h5"))[:1]
        attrs = read_store_attrs(stores[0]) if stores else {}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}
    keys = {"encoder": "feature_encoder", "transform": "feature_transform", "target_mpp": "feature_target_mpp",
            "patch_size": "feature_patch_size"}
    return {new: attrs[old] for old, new in keys.items() if attrs.get(old) is not None}


def _slide_cache_dir(slide: Path, work_dir: str | os.PathLike | None) -> Path:
    """Per-slide cache folder; a `source.json` guards against two different slides with the same name."""
    base = Path(work_dir) if work_dir else DEFAULT_CACHE / slide.stem
    output_folder(base, "--work-dir", "cache folder")
    st = slide.stat()
    source = {"path": str(slide.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    marker = base / "source.json"
    if marker.exists():
        try:
            old = json.loads(marker.read_text())
        except ValueError:  # cut by a crash: treat as another slide
            old = None
        if old != source:  # another file under the same name (or the slide changed): start a fresh cache
            import shutil

            for child in base.iterdir():
                if child.name != "source.json":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    write_json(marker, source)
    return base


def mpp_cache_suffix(mpp: float | None) -> str:
    """What an --mpp override adds to the names of a slide's cache folders (`segmentation-at0.25mpp`, ...): it
    changes the segmentation and the patch geometry, so its outputs are cached apart."""
    return f"-at{mpp:g}mpp" if mpp else ""


MPP_CACHE_SUFFIX = re.compile(r"-at[0-9.e+-]+mpp$")


def prepare_slide(slide: str | os.PathLike, settings: FeatureSettings, work_dir: str | os.PathLike | None = None,
                  mpp: float | None = None, log=print) -> Path:
    """Segment, tile and extract one slide (each step reused when its output is already cached); returns
    the feature store."""
    from preprocessing.extract import extract_slide
    from preprocessing.tiling import load_coords, tile_slide
    from preprocessing.tissue import segment_slide, segmentation_paths

    slide = input_file(slide, "slide", "--slide")
    cache = _slide_cache_dir(slide, work_dir)
    at_mpp = mpp_cache_suffix(mpp)
    seg_dir = cache / f"segmentation{at_mpp}"
    if not segmentation_paths(seg_dir, slide.stem)["mask"].exists():
        log(f"segmenting {slide.name} ...")
        segment_slide(slide, seg_dir, preset=settings.seg_preset, mpp=mpp)
    tile_dir = cache / f"tiles-{settings.target_mpp:g}mpp-{settings.patch_size}px-{settings.min_tissue_fraction:g}{at_mpp}"
    coords = tile_dir / f"{slide.stem}.h5"
    if not coords.exists():
        log("tiling ...")
        coords = tile_slide(slide, tile_dir, target_mpp=settings.target_mpp, patch_size=settings.patch_size,
                            min_tissue_fraction=settings.min_tissue_fraction, preset=settings.seg_preset, mpp=mpp,
                            seg_dir=seg_dir)
    xy, attrs = load_coords(coords)
    if len(xy) == 0:
        raise InputError(f"slide {slide.name}: no tissue patches found (status {attrs.get('status')!r}); nothing "
                         f"to ask about (see the tissue contours in {seg_dir}; --preset or --mpp may help)")
    feat_dir = cache / f"features-{settings.encoder.replace(':', '_')}-{tile_dir.name.removeprefix('tiles-')}"
    log(f"features ({settings.encoder}, {len(xy)} patches) ...")
    return extract_slide(slide, coords, feat_dir, encoder=settings.encoder, checkpoint=settings.encoder_checkpoint,
                         transform=settings.transform, fmt="zarr", mpp=mpp, batch_size=settings.batch_size,
                         num_workers=settings.num_workers)


def _feature_settings(a: argparse.Namespace) -> FeatureSettings:
    recorded = model_feature_config(a.model)
    encoder = a.encoder or recorded.get("feature_encoder") or "conch_v1"
    fs = FeatureSettings(
        encoder=encoder, encoder_checkpoint=a.encoder_checkpoint,
        transform=a.transform or recorded.get("feature_transform"),
        target_mpp=a.target_mpp or float(recorded.get("feature_target_mpp", 0.5)),
        patch_size=a.patch_size or int(recorded.get("feature_patch_size", 224)),
        seg_preset=a.preset, batch_size=a.extract_batch_size, num_workers=a.num_workers,
    )
    if fs.encoder == "conch_v1" and not fs.encoder_checkpoint and not a.features:
        raise UsageError("the conch_v1 patch encoder needs local weights: pass --encoder-checkpoint PATH "
                         "(pytorch_model.bin of CONCH), or --encoder conch_tiny for the demo model")
    return fs


def _add_common(p: argparse.ArgumentParser) -> None:
    from preprocessing.tissue import PRESETS
    from slidechat.evaluate import add_generation_arguments

    p.add_argument("--slide", required=True, help="whole-slide image (any format OpenSlide reads)")
    model_default = os.environ.get(MODEL_ENV) or os.environ.get("SLIDECHAT_CHECKPOINT")
    p.add_argument("--model", default=model_default,
                   help=f"model directory (ours, released SlideChat weights or xtuner layout); default: ${MODEL_ENV}")
    p.add_argument("--checkpoint", dest="model", help=argparse.SUPPRESS)  # the earlier name of --model
    p.add_argument("--llm", default=None, help="local LLM directory when the model directory does not contain it")
    p.add_argument("--encoder", default=None, help="patch encoder (default: recorded in the model dir, else conch_v1)")
    p.add_argument("--encoder-checkpoint", default=None, help="patch encoder weights (required for conch_v1)")
    p.add_argument("--transform", default=None, help="patch transform (default: the encoder's/model's own)")
    p.add_argument("--target-mpp", type=float, default=None,
                   help="patch resolution in µm/px (default: recorded in the model dir, else 0.5)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="patch size in px at --target-mpp (default: recorded in the model dir, else 224)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="segmentation and tiling preset, as `python -m preprocessing tile --preset` (default: ours)")
    p.add_argument("--seg-preset", dest="preset", choices=sorted(PRESETS), help=argparse.SUPPRESS)  # earlier name
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for slides that do not record it")
    p.add_argument("--work-dir", default=None, help="cache folder (default ~/.cache/wsi-slidechat/<slide_id>/)")
    p.add_argument("--features", default=None, help="use this feature store instead of preprocessing the slide")
    p.add_argument("--extract-batch-size", type=int, default=64, help="patches per encoder forward pass")
    p.add_argument("--num-workers", type=int, default=0, help="patch reader processes (0: in this process)")
    add_generation_arguments(p)


def _load(a: argparse.Namespace, log) -> tuple[Any, Any]:
    """(model, features tensor) for the parsed arguments."""
    from preprocessing.stores import SameFeatures, read_store_attrs
    from slidechat.evaluate import check_model_paths, load_model_on, load_slide_tensor, model_device_dtype
    from slidechat.model_card import trained_on_features

    if not a.model:
        raise UsageError(f"no model given: pass --model DIR (or set ${MODEL_ENV})")
    check_model_paths(a.model, a.llm)  # a path that holds no model fails before the (slow) preprocessing
    if a.features and not Path(a.features).exists():
        raise InputError(f"feature store not found: {a.features} (option --features)")
    fs = _feature_settings(a)
    notice = demo_notice(a.model)
    if notice:
        log(notice)
    store = Path(a.features) if a.features else prepare_slide(a.slide, fs, a.work_dir, a.mpp, log=log)
    # features made otherwise than the model's training stores (another encoder, checkpoint, mpp) are refused
    SameFeatures(trained_on_features(a.model)).add(store, read_store_attrs(store))
    model = load_model_on(a.model, a.llm, a.device, a.dtype)
    device, dtype = model_device_dtype(model)
    feats = load_slide_tensor(store, device, dtype, feature_dim=model.config.feature_dim)
    if feats.shape[0] == 0:
        raise InputError(f"{store}: holds no patches (a slide without tissue); nothing to ask about")
    return model, feats


def _first_turn(question: str) -> str:
    return question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"


def ask_main(argv: list[str]) -> int:
    """`slidechat ask --slide S --question Q [Q ...]`: answers printed one per question."""
    p = command_parser("slidechat ask", __doc__,
                       'slidechat ask --slide new.svs --model results/models/stage2 --question "What is the diagnosis?"')
    p.add_argument("--question", required=True, nargs="+", help="question(s) about the slide (answered in a batch)")
    _add_common(p)
    a = p.parse_args(argv)
    import torch

    log = (lambda s: print(s, file=sys.stderr))
    model, feats = _load(a, log)
    with torch.inference_mode():
        visual = model.encode_slide(feats)
        answers = model.generate(None, [_first_turn(q) for q in a.question], visual_embeds=visual,
                                 max_new_tokens=a.max_new_tokens, do_sample=False)
    answers = [answers] if isinstance(answers, str) else answers
    for q, ans in zip(a.question, answers):
        if len(a.question) > 1:
            print(f"Q: {q}\nA: {ans}\n")
        else:
            print(ans)
    return 0


EXIT_WORDS = {"/exit", "/quit", "/bye", "exit", "quit", ":q"}  # the spellings of other chat tools too
RESET_WORDS = {"/reset", "/clear", "reset", ":reset"}
CHAT_HELP = "Type a question and press Enter. /reset starts a new conversation; /exit or Ctrl-D leaves."


def chat_loop(model, feats, max_new_tokens: int, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Read questions line by line until EOF (Ctrl-D) or /exit; /reset forgets the conversation. The slide is
    encoded once, the history grows. Returns the number of questions answered."""
    import torch

    with torch.inference_mode():
        visual = model.encode_slide(feats)
    history: list[tuple[str, str]] = []  # (question, answer) turns, as SlideChat.generate takes them
    n = 0
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            break
        q = line.strip()
        if not q:
            continue
        if q.lower() in EXIT_WORDS:
            break
        if q.lower() in RESET_WORDS:
            history = []
            stdout.write("(conversation reset: the next question starts afresh)\n")
            continue
        if q.startswith("/"):  # /help, or a command mistyped
            known = q.lower() == "/help"
            stdout.write(f"({'' if known else f'unknown command {q.split()[0]}; '}{CHAT_HELP})\n")
            continue
        turn = _first_turn(q) if not history else q
        with torch.inference_mode():
            ans = model.generate(None, turn, visual_embeds=visual, history=history or None,
                                 max_new_tokens=max_new_tokens, do_sample=False)
        history.append((turn, ans))
        stdout.write(f"slidechat> {ans}\n")
        stdout.flush()
        n += 1
    return n


def chat_main(argv: list[str]) -> int:
    """`slidechat chat --slide S`: multi-turn conversation on stdin/stdout (/exit or Ctrl-D to leave, /reset)."""
    p = command_parser("slidechat chat", __doc__ + "\nIn the chat: " + CHAT_HELP,
                       "slidechat chat --slide new.svs --model results/models/stage2")
    _add_common(p)
    a = p.parse_args(argv)
    model, feats = _load(a, lambda s: print(s, file=sys.stderr))
    print(f"Chatting about {Path(a.slide).name} ({len(feats)} patches) with {a.model}.\n{CHAT_HELP}", flush=True)
    chat_loop(model, feats, a.max_new_tokens)
    return 0
