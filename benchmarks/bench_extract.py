"""Extraction speed: ours beside CLAM's and TRIDENT's own feature step, and the reading paths on their own.

    python benchmarks/bench_extract.py --clam /tmp/CLAM --trident /tmp/TRIDENT     # CPU: side by side
    python benchmarks/bench_extract.py --reading-only                               # CPU ms per patch of each reader
    python benchmarks/bench_extract.py --tuning --size 8192                         # our CPU settings, measured
    python benchmarks/bench_extract.py --gpu                                        # CONCH ViT-B/16 on CUDA

Side by side (`peer_extract.py`, each run a fresh process): the same slides and coords, the same random
ResNet-50 trunk (`resnet50_trunc`, seed 0), batch 64, on CPU; first end to end, then the data path alone
(a pixel-mean stand-in model). Runs alternate (ours, CLAM, TRIDENT, then the reverse) because the machine
may be shared: compare the ratios, not the absolute times. Patches/s are medians over rounds; "CPU ms" is
CPU time per patch of all processes of the step. A peer whose checkout is not given is skipped with a
message. Feature agreement: max |difference| and minimum cosine against CLAM / TRIDENT, for our default and
for `--preset clam` / `--preset trident`, which read and resize as those tools do.

`--tuning`: ours end to end with 0 or 1 reader process and channels_last or contiguous, the measurement
behind the CPU defaults.

`--reading-only`: CPU ms per patch to read and cut the synthetic slide's patches (no model) through OpenSlide,
the slide's own tiles decoded in a reader (libjpeg-turbo), and decoded by torchvision on the CPU (the GPU
path's code, `device_tiles`, on one torch thread), with their pixel agreement.

`--gpu`: CONCH ViT-B/16 (random weights, bf16) over replicas of the synthetic slide with tiles decoded in
the readers and on the GPU (nvJPEG): patches/s, fraction of wall time the GPU is busy (CUDA events), CPU ms
per patch (goal on one H200: >= 5k patches/s with the GPU busy >= 90%). Numbers only; nothing asserts time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocessing.encoders import build_encoder  # noqa: E402
from preprocessing.extract import ExtractOptions, SlideJob, extract_slides, plan_regions  # noqa: E402
from preprocessing.tiling import load_coords, tile_slide  # noqa: E402

CMU = Path(os.environ.get("WSI_SHARED_DIR", REPO.parent / "shared")) / "slides" / "CMU-1-Small-Region.svs"


def synthetic_slide(path: Path, size: int) -> Path:
    from preprocessing.synthetic import Scene, write_synthetic_svs

    if not path.exists():
        t = time.perf_counter()
        # 0.25 µm/px, AppMag 40, tiled JPEG, pyramid 1/4, 1/16: 0.5 µm/px patches are read at level 0 (448 px)
        write_synthetic_svs(path, Scene.random(size, size, "adenocarcinoma", seed=11, n_blobs=6), mpp=0.25,
                            downsamples=(4, 16))
        print(f"# wrote {path.name} {size}x{size} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


# --------------------------------------------------------------------------------------------------
# Side by side
# --------------------------------------------------------------------------------------------------
def run_tool(tool: str, repo: Path | None, slide: Path, coords: Path, weights: Path, out: Path, null: bool,
             preset: str | None = None, workers: int | None = None, memory_format: str = "auto") -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "peer_extract.py"), tool, "--slide", str(slide), "--coords",
           str(coords), "--weights", str(weights), "--out", str(out), "--batch", "64"]
    cmd += (["--repo", str(repo)] if repo else []) + (["--null"] if null else [])
    cmd += (["--preset", preset] if preset else []) + (["--workers", str(workers)] if workers is not None else [])
    cmd += ["--memory-format", memory_format] if tool == "ours" else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return f"max|d| {np.abs(a - b).max():.1e}, min cos {cos.min():.6f}"


def side_by_side(name: str, slide: Path, coords: Path, weights: Path, peers: dict[str, Path | None], work: Path,
                 rounds: int, results: dict) -> None:
    n = len(load_coords(coords)[0])
    a = load_coords(coords)[1]
    print(f"\n## {name}: {slide.name}, {n} patches (read {a['read_size']} px at level {a['read_level']} -> "
          f"{a['patch_size']})", flush=True)
    tools = ["ours"] + [t for t, repo in peers.items() if repo is not None]
    for t, repo in peers.items():
        if repo is None:
            print(f"# {t}: no checkout given (--{t} DIR): skipped", flush=True)
    for null in (False, True):
        label = "data path (pixel-mean model)" if null else "end to end (ResNet-50 trunc)"
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for r in range(rounds):
            for t in (tools if r % 2 == 0 else tools[::-1]):
                out = work / f"{name}-{t}-{'null' if null else 'r50'}.npz"
                runs[t].append(run_tool(t, peers.get(t), slide, coords, weights, out, null))
        rate = {t: statistics.median(n / x["seconds"] for x in runs[t]) for t in tools}
        cpu = {t: statistics.median(1000 * x["cpu_seconds"] / n for x in runs[t]) for t in tools}
        print(f"### {label}, {rounds} rounds", flush=True)
        print("| tool | patches/s | CPU ms/patch | ours / tool |")
        print("| --- | --- | --- | --- |")
        for t in tools:
            print(f"| {t} | {rate[t]:.1f} | {cpu[t]:.1f} | {rate['ours'] / rate[t]:.2f} |")
        results.setdefault(name, {})["null" if null else "resnet50_trunc"] = {"patches": n, "patches_per_s": rate,
                                                                             "cpu_ms_per_patch": cpu}
    # feature agreement (end to end): our default and each preset against each tool
    feats = {t: np.load(work / f"{name}-{t}-r50.npz")["features"] for t in tools}
    lines = []
    for preset in ("clam", "trident"):
        if preset not in feats:
            continue
        run_tool("ours", None, slide, coords, weights, work / f"{name}-ours-{preset}.npz", False, preset)
        mine = np.load(work / f"{name}-ours-{preset}.npz")["features"]
        lines.append(f"| {preset} | default: {agreement(feats['ours'], feats[preset])} | "
                     f"--preset {preset}: {agreement(mine, feats[preset])} |")
    if lines:
        print("### feature agreement with the tools (fp32)\n| tool | ours (default) | ours (preset) |\n| --- | --- | --- |")
        print("\n".join(lines), flush=True)


def tuning(slide: Path, coords: Path, weights: Path, work: Path, rounds: int, results: dict) -> None:
    """Our settings for a CPU device, by measurement: readers and memory format, end to end (ResNet-50 trunc)."""
    n = len(load_coords(coords)[0])
    configs = {"0 readers, channels_last (default)": (0, "channels_last"), "1 reader, channels_last": (1, "channels_last"),
               "0 readers, contiguous": (0, "contiguous")}
    print(f"\n## tuning on this CPU: {slide.name}, {n} patches, ResNet-50 trunc, {rounds} rounds", flush=True)
    runs: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(rounds):
        for label in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            workers, fmt = configs[label]
            x = run_tool("ours", None, slide, coords, weights, work / "tuning.npz", False, None, workers, fmt)
            runs[label].append(n / x["seconds"])
            cpu[label].append(1000 * x["cpu_seconds"] / n)
    base = statistics.median(runs[next(iter(configs))])
    print("| setting | patches/s | CPU ms/patch | vs default |\n| --- | --- | --- | --- |")
    for label in configs:
        rate = statistics.median(runs[label])
        print(f"| {label} | {rate:.1f} | {statistics.median(cpu[label]):.1f} | {rate / base:.2f} |", flush=True)
        results.setdefault("tuning", {})[label] = {"patches_per_s": rate, "cpu_ms_per_patch": statistics.median(cpu[label])}


# --------------------------------------------------------------------------------------------------
# Reading alone
# --------------------------------------------------------------------------------------------------
def reading_only(slide: Path, coords_h5: Path, results: dict) -> None:
    from preprocessing.device_tiles import decode_crops
    from preprocessing.readers import PatchRing, Reader, RegionTask

    xy, a = load_coords(coords_h5)
    level, rs, ps = int(a["read_level"]), int(a["read_size"]), int(a["patch_size"])
    ds = tuple(float(v) for v in a["read_downsample_xy"])
    groups = plan_regions(xy, np.arange(len(xy)), ds, rs, 2048)
    print(f"\n## reading alone: {slide.name}, {len(xy)} patches, {rs} px -> {ps}, CPU ms per patch", flush=True)
    out: dict[str, np.ndarray] = {}
    timing: dict[str, list[float]] = {"openslide": [], "tiles, reader decode": [], "tiles, torchvision decode": []}
    # one thread, like a reader process: torch's thread pool spins on small ops and would bill a busy machine
    # several times the work (a region's tile copies: 1-2 ms on one thread, 70-90 ms CPU on two here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for r in range(3):
        for label in (list(timing) if r % 2 == 0 else list(timing)[::-1]):
            ring = PatchRing(1, len(xy), ps)
            reader = Reader()
            c0 = time.process_time()
            for g in groups:
                places = np.stack([np.zeros_like(g), g], axis=1)
                if label == "tiles, torchvision decode":
                    res = reader.read(RegionTask(0, str(slide), None, level, rs, ps, ds, g, xy[g], None, places,
                                                 tiles="bytes"))
                    ring.array[0, g] = decode_crops(res.crops, ps, torch.device("cpu")).numpy()
                else:
                    tiles = "off" if label == "openslide" else "decode"
                    reader.read(RegionTask(0, str(slide), None, level, rs, ps, ds, g, xy[g], (ring.name, ring.shape),
                                           places, tiles=tiles))
            timing[label].append(1000 * (time.process_time() - c0) / len(xy))
            out[label] = ring.array[0].copy()
            reader.close()
            ring.close()
    torch.set_num_threads(threads)
    ref = out["openslide"].astype(int)
    print("| source | CPU ms/patch | pixels vs OpenSlide |\n| --- | --- | --- |")
    for label, ms in timing.items():
        d = np.abs(out[label].astype(int) - ref)
        agree = "identical" if d.max() == 0 else f"max |d| {d.max()}, {100 * (d == 0).mean():.3f}% equal"
        print(f"| {label} | {statistics.median(ms):.2f} | {agree} |", flush=True)
        results.setdefault("reading_only", {})[label] = {"cpu_ms_per_patch": statistics.median(ms),
                                                          "max_abs_pixel_diff": int(d.max())}


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
def replicate(slide: Path, coords: Path, k: int, work: Path) -> list[SlideJob]:
    """k jobs over the same slide under different slide ids (links + coords copies), for longer GPU runs."""
    jobs = []
    work.mkdir(parents=True, exist_ok=True)
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


def gpu_suite(slide: Path, coords: Path, work: Path, copies: int, workers: int | None, batch: int, results: dict) -> None:
    jobs = replicate(slide, coords, copies, work / "replicas")
    enc = build_encoder("conch_v1", transform="slidechat", allow_random=True, device="cuda")
    for decode in ("device", "reader"):
        opts = ExtractOptions(encoder=enc.name, num_workers=workers, batch_size=batch, progress_every_s=1e9,
                              dtype="float16", tile_decode=decode)
        shutil.rmtree(work / "warm", ignore_errors=True)
        extract_slides(jobs[:2], work / "warm", opts, encoder=enc)  # cuDNN/nvJPEG warm-up
        shutil.rmtree(work / "gpu", ignore_errors=True)
        st: dict = {}
        extract_slides(jobs, work / "gpu", opts, encoder=enc, stats=st)
        busy = st["model_busy_s"] / st["wall_s"]
        rate = st["patches"] / st["wall_s"]
        print(f"CONCH ViT-B/16 bf16 @ 224, tiles decoded on the {decode}: {rate:8.1f} patches/s over {st['patches']} "
              f"patches, GPU busy {100 * busy:5.1f}%, CPU {1000 * st['cpu_s'] / st['patches']:.2f} ms/patch "
              f"({st['settings']['num_workers']} readers, batch {batch})", flush=True)
        results[f"gpu_conch_v1_224_{decode}"] = {**st, "gpu_busy_fraction": busy, "patches_per_s": rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "extract")
    ap.add_argument("--size", type=int, default=16384, help="synthetic slide side at 40x (px)")
    ap.add_argument("--clam", type=Path, help="CLAM checkout (e.g. fetched to /tmp/CLAM)")
    ap.add_argument("--trident", type=Path, help="TRIDENT checkout")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-cmu", action="store_true")
    ap.add_argument("--reading-only", action="store_true")
    ap.add_argument("--tuning", action="store_true", help="our CPU settings: readers, memory format")
    ap.add_argument("--gpu", action="store_true", help="CONCH ViT-B/16 on CUDA only")
    ap.add_argument("--gpu-copies", type=int, default=24, help="replicas of the synthetic slide for the GPU run")
    ap.add_argument("--gpu-workers", type=int, help="reader processes (default: chosen for the device)")
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}", flush=True)
    results: dict = {}
    slide = synthetic_slide(args.work / f"synthetic40x-{args.size}.svs", args.size)
    coords = tile_slide(slide, args.work / "tiles", target_mpp=0.5, patch_size=224, min_tissue_fraction=0.25)
    if args.gpu:
        if not torch.cuda.is_available():
            print("no CUDA device here: GPU suite not run")
        else:
            print(f"\n## GPU: {torch.cuda.get_device_name()}", flush=True)
            gpu_suite(slide, coords, args.work, args.gpu_copies, args.gpu_workers, args.gpu_batch, results)
    elif args.reading_only:
        reading_only(slide, coords, results)
    elif args.tuning:
        weights = args.work / "resnet50_trunc_seed0.pt"
        torch.save(build_encoder("resnet50_trunc", allow_random=True, seed=0).model.net.state_dict(), weights)
        tuning(slide, coords, weights, args.work, args.rounds, results)
    else:
        weights = args.work / "resnet50_trunc_seed0.pt"
        torch.save(build_encoder("resnet50_trunc", allow_random=True, seed=0).model.net.state_dict(), weights)
        peers = {"clam": args.clam, "trident": args.trident}
        for t, repo in peers.items():
            if repo is not None and not repo.is_dir():
                print(f"# {t}: {repo} is not a directory: skipped")
                peers[t] = None
        side_by_side("synthetic 40x", slide, coords, weights, peers, args.work, args.rounds, results)
        if not args.no_cmu and CMU.exists():
            cmu_coords = tile_slide(CMU, args.work / "tiles", target_mpp=0.5, patch_size=224, min_tissue_fraction=0.25)
            side_by_side("CMU-1-Small-Region", CMU, cmu_coords, weights, peers, args.work, args.rounds, results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
