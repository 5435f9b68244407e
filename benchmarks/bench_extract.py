"""Extraction data-path benchmark: naive per-patch reads vs our region reads, with and without a model.

    python benchmarks/bench_extract.py                      # synthetic 40x JPEG SVS + the real CMU slide (CPU)
    python benchmarks/bench_extract.py --gpu                # + CONCH ViT-B/16 (random weights) at 224 and 448, bf16

Prints patches/s for
  (a) the naive loop: one OpenSlide `read_region` per patch, PIL convert/resize, torchvision transform
      (what CLAM and TRIDENT do per patch), single process;
  (b) our data path without a model: region reads cut into patches, uint8 batches, device-side
      normalisation, store writes (a null model stands in for the encoder);
  (c) the same with the tiny CONCH-architecture encoder;
and the ratio b/a (goal on 2 CPU cores: >= 2). With --gpu also CONCH ViT-B/16 patches/s and the fraction
of wall time the GPU is busy (goal >= 90%). Numbers only; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import h5py
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocessing.encoders import PatchEncoder, build_encoder, get_transform  # noqa: E402
from preprocessing.extract import ExtractOptions, SlideJob, extract_slides  # noqa: E402
from preprocessing.tiling import load_coords, tile_slide  # noqa: E402

CMU = Path(os.environ.get("WSI_SHARED_DIR", REPO.parent / "shared")) / "slides" / "CMU-1-Small-Region.svs"


class NullModel(nn.Module):
    """Stands in for the encoder in (b): touches every input value, costs next to nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).repeat(1, 171)[:, :512]


def null_encoder() -> PatchEncoder:
    return PatchEncoder("null", NullModel(), get_transform("slidechat"), 512, {"arch": "null"}, None, None, 0)


def synthetic_slide(path: Path, size: int) -> Path:
    from preprocessing.synthetic import Scene, write_synthetic_svs

    if not path.exists():
        t = time.perf_counter()
        # 0.25 µm/px, AppMag 40, tiled JPEG, pyramid 1/4, 1/16: 0.5 µm/px patches are read at level 0 (448 px)
        write_synthetic_svs(path, Scene.random(size, size, "adenocarcinoma", seed=11, n_blobs=6), mpp=0.25,
                            downsamples=(4, 16))
        print(f"# wrote {path.name} {size}x{size} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def replicate(slide: Path, coords: Path, k: int, work: Path) -> list[SlideJob]:
    """k jobs over the same slide under different slide ids (links + coords copies), for longer GPU runs."""
    jobs = []
    for i in range(k):
        sid = f"{slide.stem}-r{i:03d}"
        link = work / f"{sid}{slide.suffix}"
        if not link.exists():
            link.symlink_to(slide.resolve())
        c = work / f"{sid}.h5"
        if not c.exists():
            shutil.copy(coords, c)
            with h5py.File(c, "r+") as f:
                f["coords"].attrs["slide_id"] = sid
                f["coords"].attrs["name"] = sid
        jobs.append(SlideJob(link, c))
    return jobs


def naive(slide: Path, coords_h5: Path, batch_size: int = 64) -> float:
    """(a): per-patch read_region -> PIL RGB -> resize -> ToTensor/Normalize -> batch. Returns patches/s."""
    import openslide
    from PIL import Image
    from torchvision import transforms as T

    xy, attrs = load_coords(coords_h5)
    level, rs, ps = int(attrs["read_level"]), int(attrs["read_size"]), int(attrs["patch_size"])
    spec = get_transform("slidechat")
    tf = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    osr = openslide.OpenSlide(str(slide))
    t = time.perf_counter()
    batch = []
    for x, y in xy:
        img = osr.read_region((int(x), int(y)), level, (rs, rs)).convert("RGB")
        if rs != ps:
            img = img.resize((ps, ps), Image.BILINEAR)
        batch.append(tf(img))
        if len(batch) == batch_size:
            torch.stack(batch)
            batch = []
    if batch:
        torch.stack(batch)
    dt = time.perf_counter() - t
    osr.close()
    return len(xy) / dt


def ours(jobs: list[SlideJob], out: Path, encoder: PatchEncoder, workers: int, batch_size: int = 64) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    stats: dict = {}
    opts = ExtractOptions(encoder=encoder.name, num_workers=workers, batch_size=batch_size, progress_every_s=1e9,
                          dtype="float16")
    t = time.perf_counter()
    extract_slides(jobs, out, opts, encoder=encoder, stats=stats)
    stats["total_s"] = time.perf_counter() - t  # includes pool start-up
    stats["patches_per_s"] = stats["patches"] / stats["wall_s"]
    return stats


def cpu_suite(name: str, slide: Path, coords: Path, work: Path, workers: list[int], results: dict) -> None:
    n = len(load_coords(coords)[0])
    print(f"\n## {name}: {slide.name}, {n} patches (read {load_coords(coords)[1]['read_size']} px -> 224)", flush=True)
    a = max(naive(slide, coords) for _ in range(2))  # best of 2: first pass warms the page cache
    print(f"(a) naive per-patch loop            : {a:8.1f} patches/s", flush=True)
    res = {"patches": n, "a_naive": a}
    null, tiny = null_encoder(), build_encoder("conch_tiny")
    for w in workers:
        b = max(ours([SlideJob(slide, coords)], work / f"b{w}", null, w)["patches_per_s"] for _ in range(2))
        print(f"(b) ours, no model, {w} reader(s)    : {b:8.1f} patches/s   b/a = {b / a:5.2f}", flush=True)
        res[f"b_workers{w}"] = b
    for w in workers:
        c = ours([SlideJob(slide, coords)], work / f"c{w}", tiny, w)["patches_per_s"]
        print(f"(c) ours, conch_tiny, {w} reader(s)  : {c:8.1f} patches/s", flush=True)
        res[f"c_workers{w}"] = c
    results[name] = res


def gpu_suite(slide: Path, coords: Path, work: Path, copies: int, workers: int, batch_size: int, results: dict) -> None:
    jobs = replicate(slide, coords, copies, work / "replicas")
    for transform in ("slidechat", "conch_official"):
        enc = build_encoder("conch_v1", transform=transform, allow_random=True, device="cuda")
        ours(jobs[:2], work / "warm", enc, workers, batch_size)  # cuDNN/autotune warm-up
        st = ours(jobs, work / f"gpu-{transform}", enc, workers, batch_size)
        busy = st["model_busy_s"] / st["wall_s"]
        size = enc.transform.size
        print(f"CONCH ViT-B/16 bf16 @ {size}: {st['patches_per_s']:8.1f} patches/s over {st['patches']} patches, "
              f"GPU busy {100 * busy:5.1f}% ({workers} readers, batch {batch_size})", flush=True)
        results[f"gpu_conch_v1_{size}"] = {**st, "gpu_busy_fraction": busy, "workers": workers, "batch": batch_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "extract")
    ap.add_argument("--size", type=int, default=8192, help="synthetic slide side at 40x (px)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-cmu", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="also CONCH ViT-B/16 on CUDA")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--gpu-copies", type=int, default=24, help="replicas of the synthetic slide for the GPU run")
    ap.add_argument("--gpu-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "replicas").mkdir(exist_ok=True)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}", flush=True)

    results: dict = {}
    slide = synthetic_slide(args.work / f"synthetic40x-{args.size}.svs", args.size)
    coords = tile_slide(slide, args.work / "tiles", target_mpp=0.5, patch_size=224, min_tissue_fraction=0.25)
    if not args.gpu_only:
        cpu_suite("synthetic 40x JPEG pyramid", slide, coords, args.work, args.workers, results)
        if not args.no_cmu and CMU.exists():
            cmu_coords = tile_slide(CMU, args.work / "tiles", target_mpp=0.5, patch_size=224, min_tissue_fraction=0.0)
            cpu_suite("real CMU-1-Small-Region", CMU, cmu_coords, args.work, args.workers, results)
    if args.gpu or args.gpu_only:
        if not torch.cuda.is_available():
            print("no CUDA device: GPU suite skipped")
        else:
            print(f"\n## GPU: {torch.cuda.get_device_name()}", flush=True)
            gpu_suite(slide, coords, args.work, args.gpu_copies, args.gpu_workers, args.gpu_batch, results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
