"""Segmentation + tiling: ours versus the naive way, time and peak memory.

Ours: thumbnail at 8 µm/px read in bounded pieces, vectorised tissue fractions from an integral image
(measured as the same work as the naive way, and again as the full `tile` step with its output files).
Naive: the whole read level (the level patches are cut from) loaded in one `read_region`, saturation
threshold at that resolution, and a Python loop testing each grid patch.

Slides: a synthetic 40x pyramid of at least 40,000 x 40,000 px (written once to benchmarks/out/, levels
2x, 8x, 32x) and the real CMU-1-Small-Region.svs when ../shared is present. Each measurement runs in a
fresh process, so peak RSS is that method's own. Prints seconds, peak MB and the naive/ours ratios.

    python benchmarks/bench_tiling.py [--size 40960]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
sys.path.insert(0, str(REPO))


def ours(slide: str, out_dir: str, queue: mp.Queue) -> None:
    """Segmentation + patch selection, the same work the naive function does (no output files)."""
    from preprocessing.slide import WholeSlide
    from preprocessing.tiling import TilingParams, patches_on_tissue
    from preprocessing.tissue import SegmentationParams, segment_slide_object

    t0 = time.perf_counter()
    with WholeSlide(slide) as ws:
        result = segment_slide_object(ws, SegmentationParams())
        coords, _, _ = patches_on_tissue(ws, result.tissue, TilingParams())
    elapsed = time.perf_counter() - t0
    queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, len(coords)))


def ours_cli(slide: str, out_dir: str, queue: mp.Queue) -> None:
    """The full `tile` step: segmentation, selection and every output file (mask, overlays, GeoJSON, H5)."""
    from preprocessing.tiling import load_coords, tile_slide

    t0 = time.perf_counter()
    h5 = tile_slide(slide, out_dir)
    elapsed = time.perf_counter() - t0
    queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, len(load_coords(h5)[0])))


def naive(slide: str, out_dir: str, queue: mp.Queue) -> None:
    import cv2

    from preprocessing.slide import WholeSlide
    from preprocessing.tiling import PatchGeometry, TilingParams, grid_coords

    t0 = time.perf_counter()
    with WholeSlide(slide) as ws:
        geom = PatchGeometry.for_slide(ws, TilingParams())
        level = geom.read_level
        image = ws.read_region((0, 0), level, ws.level_dimensions[level])  # the whole level at once
        sat = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[:, :, 1]
        del image
        sat = cv2.medianBlur(sat, 7)
        thresh, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        tissue = sat > max(thresh, 15)
        dx, dy = geom.read_downsample_xy
        kept = []
        for x, y in grid_coords(ws.dimensions, geom):  # per-patch test in Python
            lx, ly = int(x / dx), int(y / dy)
            if tissue[ly : ly + geom.read_size, lx : lx + geom.read_size].mean() >= 0.5:
                kept.append((x, y))
    elapsed = time.perf_counter() - t0
    queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, len(kept)))


def measure(fn, slide: Path, out_dir: Path) -> tuple[float, float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(str(slide), str(out_dir), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def large_slide(size: int) -> Path:
    from preprocessing.synthetic import Scene, write_synthetic_svs

    path = OUT / f"synthetic_{size}.svs"
    if not path.exists():
        print(f"writing a {size}x{size} synthetic 40x pyramid to {path} (once) ...", flush=True)
        t0 = time.perf_counter()
        scene = Scene.random(size, size, "generic", seed=7, n_blobs=5)
        write_synthetic_svs(path, scene, mpp=0.25, downsamples=(2, 8, 32))
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40960, help="level-0 side of the synthetic slide")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    slides = [large_slide(args.size)]
    cmu = REPO.parent / "shared" / "slides" / "CMU-1-Small-Region.svs"
    if cmu.exists():
        slides.append(cmu)
    else:
        print(f"(skipping the real slide: {cmu} not found)")
    print(f"{'slide':<28} {'method':<20} {'seconds':>8} {'peak MB':>8} {'patches':>8}")
    rows = []
    for slide in slides:
        res_ours = measure(ours, slide, OUT / "tiling_ours")
        res_cli = measure(ours_cli, slide, OUT / "tiling_ours")
        res_naive = measure(naive, slide, OUT / "tiling_naive")
        for name, (sec, mb, n) in (("ours", res_ours), ("ours + output files", res_cli), ("naive", res_naive)):
            print(f"{slide.name:<28} {name:<20} {sec:>8.2f} {mb:>8.0f} {n:>8}")
        rows.append((slide.name, res_ours, res_naive))
    print()
    for name, (s_o, m_o, _), (s_n, m_n, _) in rows:
        print(f"{name}: speed-up naive/ours = {s_n / s_o:.1f}x (goal >= 5x), peak memory naive/ours = {m_n / m_o:.1f}x")
    if len(rows) == 2:
        print(f"ours, peak memory large/small slide = {rows[0][1][1] / rows[1][1][1]:.2f} "
              f"(slide area ratio {args.size**2 / (2220 * 2967):.0f}x): bounded, independent of slide size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
