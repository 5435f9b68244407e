"""Run CLAM's or TRIDENT's own feature-extraction step from its checkout (never copied here), or ours, in a
fresh process, for side-by-side comparison (`bench_extract.py`) and reference data (`peer_references.py`).

    python benchmarks/peer_extract.py clam    --repo /tmp/CLAM    --slide S.svs --coords tiles/S.h5 --weights w.pt --out o.npz
    python benchmarks/peer_extract.py trident --repo /tmp/TRIDENT --slide S.svs --coords tiles/S.h5 --weights w.pt --out o.npz
    python benchmarks/peer_extract.py ours [--preset clam] --slide S.svs --coords tiles/S.h5 --weights w.pt --out o.npz

- CLAM: its `extract_features_fp.py` runs as a script (runpy) on a CLAM-layout folder (slide link, coords H5
  with CLAM's attributes `patch_level` = our read level and `patch_size` = our read size, `--target_patch_size`
  = our patch size), with `--model_name resnet50_trunc --batch_size B`.
- TRIDENT: `OpenSlideWSI(...).extract_patch_features(ResNet50InferenceEncoder(weights_path=...), coords, ...)`
  on our coords file, which carries the attributes TRIDENT reads (patch_size, level0/target magnification).
The ResNet-50 weights come from `--weights` (our `resnet50_trunc` trunk's state dict): CLAM's builder would
download ImageNet weights, so `timm.create_model` is wrapped to build without them and load the file instead.
`--null` swaps the model for a pixel-mean stand-in (data path only). `--record-pixels` records the sha256 of
every patch as the tool hands it to `ToTensor` (needs the tool's loader in-process: CLAM on CPU already is;
TRIDENT gets `max_workers=0`).

- ours: `extract_slides` with `resnet50_trunc` loaded from the same weights (timed without building it).

Writes `--out` (.npz: features, coords, pixel digests) and prints one JSON line: seconds and CPU seconds
of the tool's per-slide step (CLAM: from its `open_slide` call to the end; TRIDENT: `extract_patch_features`;
ours: `extract_slides`, readers' CPU included), patches, and the tool's commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # DataLoader workers, once joined
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class PixelRecorder:
    """Wraps a transform step (ToTensor): records sha256 of each uint8 image it is given, then applies it."""

    def __init__(self, step):
        self.step, self.digests = step, []

    def __call__(self, img):
        self.digests.append(hashlib.sha256(np.ascontiguousarray(np.asarray(img, np.uint8)).tobytes()).digest())
        return self.step(img)


def wrap_to_tensor(compose, recorder_box: list) -> None:
    from torchvision import transforms as T

    for i, step in enumerate(compose.transforms):
        if isinstance(step, T.ToTensor):
            compose.transforms[i] = recorder_box[0] = PixelRecorder(step)
            return
    raise RuntimeError("no ToTensor step in the tool's transforms")


class MeanModel:
    """Pixel-mean stand-in for the encoder: costs next to nothing, touches every input value."""

    def __new__(cls):
        import torch

        class _Mean(torch.nn.Module):
            def forward(self, x):
                return x.mean(dim=(2, 3))

        return _Mean()


def patch_timm_weights(weights: Path) -> None:
    """`timm.create_model(..., pretrained=True)` would download ImageNet weights: build without, load ours."""
    import timm
    import torch

    original = timm.create_model
    state = torch.load(weights, map_location="cpu", weights_only=True)

    def create_model(name, *args, **kwargs):
        wanted = kwargs.pop("pretrained", False)
        model = original(name, *args, pretrained=False, **kwargs)
        if wanted:
            model.load_state_dict(state, strict=True)
        return model

    timm.create_model = create_model


def run_clam(args, record: list) -> tuple[np.ndarray, np.ndarray, float, float]:
    sys.path.insert(0, str(args.repo))
    os.chdir(args.repo)
    patch_timm_weights(args.weights)
    import models  # CLAM's package

    original_get_encoder = models.get_encoder

    def get_encoder(model_name, target_img_size=224):
        model, transforms = original_get_encoder(model_name, target_img_size=target_img_size)
        if args.null:
            model = MeanModel()
        if args.record_pixels:
            wrap_to_tensor(transforms, record)
        return model, transforms

    models.get_encoder = get_encoder
    import openslide

    clock: dict[str, float] = {}
    open_slide = openslide.open_slide

    def timed_open_slide(path):  # CLAM's per-slide work starts here
        clock.setdefault("t0", time.perf_counter())
        clock.setdefault("c0", cpu_seconds())
        return open_slide(path)

    openslide.open_slide = timed_open_slide
    with h5py.File(args.coords, "r") as f:
        coords = f["coords"][:]
        attrs = dict(f["coords"].attrs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide_id = args.slide.stem
        (tmp / "slides").mkdir()
        (tmp / "slides" / args.slide.name).symlink_to(args.slide.resolve())
        (tmp / "h5" / "patches").mkdir(parents=True)
        with h5py.File(tmp / "h5" / "patches" / f"{slide_id}.h5", "w") as f:
            d = f.create_dataset("coords", data=coords)
            d.attrs["patch_level"] = int(attrs["read_level"])
            d.attrs["patch_size"] = int(attrs["read_size"])
        (tmp / "list.csv").write_text(f"slide_id\n{args.slide.name}\n")
        sys.argv = ["extract_features_fp.py", "--data_h5_dir", str(tmp / "h5"), "--data_slide_dir", str(tmp / "slides"),
                    "--csv_path", str(tmp / "list.csv"), "--feat_dir", str(tmp / "feats"), "--batch_size",
                    str(args.batch), "--slide_ext", args.slide.suffix, "--model_name", "resnet50_trunc",
                    "--target_patch_size", str(int(attrs["patch_size"])), "--no_auto_skip"]
        runpy.run_path(str(args.repo / "extract_features_fp.py"), run_name="__main__")
        seconds, cpu = time.perf_counter() - clock["t0"], cpu_seconds() - clock["c0"]
        with h5py.File(tmp / "feats" / "h5_files" / f"{slide_id}.h5", "r") as f:
            return f["features"][:], f["coords"][:], seconds, cpu


def run_trident(args, record: list) -> tuple[np.ndarray, np.ndarray, float, float]:
    sys.path.insert(0, str(args.repo))
    from trident import OpenSlideWSI
    from trident.patch_encoder_models.load import ResNet50InferenceEncoder

    encoder = ResNet50InferenceEncoder(weights_path=Path(args.weights))
    if args.null:
        encoder.model = MeanModel()
        encoder.pool = None
    if args.record_pixels:
        wrap_to_tensor(encoder.eval_transforms, record)
    wsi_kwargs = {"slide_path": str(args.slide), "lazy_init": False}
    if args.mpp:
        wsi_kwargs["mpp"] = args.mpp
    if args.record_pixels:
        wsi_kwargs["max_workers"] = 0  # recordings must happen in this process
    wsi = OpenSlideWSI(**wsi_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), cpu_seconds()
        path = wsi.extract_patch_features(encoder, str(args.coords), tmp, device="cpu", batch_limit=args.batch)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        with h5py.File(path, "r") as f:
            return f["features"][:], f["coords"][:], seconds, cpu


def run_ours(args, record: list) -> tuple[np.ndarray, np.ndarray, float, float]:
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from preprocessing.encoders import PatchEncoder, build_encoder, get_transform
    from preprocessing.extract import ExtractOptions, SlideJob, extract_slides

    if args.null:
        encoder = PatchEncoder("null", MeanModel(), get_transform("imagenet"), 3, {"arch": "mean"}, None, None, 0)
    else:
        encoder = build_encoder("resnet50_trunc", checkpoint=args.weights)
    opts = ExtractOptions(encoder=encoder.name, fmt="h5", batch_size=args.batch, preset=args.preset,
                          num_workers=args.workers, memory_format=args.memory_format, progress_every_s=1e9)
    with tempfile.TemporaryDirectory() as tmp:
        stats: dict = {}
        t0 = time.perf_counter()
        out = extract_slides([SlideJob(args.slide, args.coords, args.mpp)], tmp, opts, encoder=encoder, stats=stats)[0]
        seconds = time.perf_counter() - t0
        with h5py.File(out, "r") as f:
            return f["features"][:], f["coords"][:], seconds, stats["cpu_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tool", choices=["clam", "trident", "ours"])
    ap.add_argument("--repo", type=Path, help="the tool's checkout (clam, trident)")
    ap.add_argument("--preset", choices=["clam", "trident"], help="ours: read pixels as that tool does")
    ap.add_argument("--workers", type=int, help="ours: reader processes (default: chosen for the device)")
    ap.add_argument("--memory-format", default="auto", help="ours: channels_last | contiguous | auto")
    ap.add_argument("--slide", type=Path, required=True)
    ap.add_argument("--coords", type=Path, required=True, help="our coords file (tiling)")
    ap.add_argument("--weights", type=Path, required=True, help="ResNet-50 trunk state dict (torch.save)")
    ap.add_argument("--out", type=Path, required=True, help=".npz with features, coords, pixel digests")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mpp", type=float, help="level-0 µm/px for slides without it (TRIDENT)")
    ap.add_argument("--null", action="store_true", help="pixel-mean stand-in model (data path only)")
    ap.add_argument("--record-pixels", action="store_true")
    args = ap.parse_args()
    if args.tool != "ours" and args.repo is None:
        ap.error(f"{args.tool} needs --repo (its checkout)")
    args.slide, args.coords = args.slide.resolve(), args.coords.resolve()
    args.repo = args.repo.resolve() if args.repo else None
    args.weights, args.out = args.weights.resolve(), args.out.resolve()
    record: list = [None]
    runner = {"clam": run_clam, "trident": run_trident, "ours": run_ours}[args.tool]
    feats, coords, seconds, cpu = runner(args, record)
    digests = np.frombuffer(b"".join(record[0].digests), np.uint8).reshape(-1, 32) if record[0] else np.zeros((0, 32), np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, features=np.asarray(feats, np.float32), coords=np.asarray(coords, np.int64), pixel_sha256=digests)
    repo = args.repo or Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"tool": args.tool, "seconds": seconds, "cpu_seconds": cpu, "patches": int(len(feats)),
                      "commit": commit, "null_model": args.null}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
