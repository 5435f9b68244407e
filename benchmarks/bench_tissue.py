"""How much tissue the tiling keeps, and how much background it takes with it: ours, CLAM's, TRIDENT's.

For each slide and tiling method, over the union of kept patch footprints:
  recall          = tissue pixels covered / tissue pixels
  background      = covered pixels that are not tissue / covered pixels (area past the slide edge counts)
measured on one 8 µm/px grid per slide (the area-averaged thumbnail `WholeSlide.thumbnail_at_mpp(8.0)`); a
grid pixel is covered when its centre lies inside a kept patch.

Tissue:
  real slides       S > 8 where S is OpenCV's HSV saturation (0-255) of that thumbnail, pixel by pixel: no blur,
                    no closing, no area filter. 8 is CLAM's tcga.csv sthresh; glass is S <= 3 on both slides.
                    (Otsu on S, 48 on CMU, would call the pale dermis background.)
  synthetic cohort  the scene's own tissue (preprocessing.synthetic.Scene.tissue), known exactly

Methods: `default` (this package's defaults), `clam` (--preset clam: CLAM's tcga.csv, a_t = 16), `clam a_t=1`
(CLAM's tcga.csv with a_t = 1; a_t = 16 drops the 0.5 mm² CMU section), `trident` (--preset trident) and
`old default` (before issue 13: off-centre closing, 20,000 µm² area filter, min tissue fraction 0.5).
Patches are 224 px at 0.5 µm/px. The TCGA slide has no pixel size; like the tests it is read at 0.25 µm/px.
--sweep also prints the candidate keep rules the default was chosen from.

    python benchmarks/bench_tissue.py [--sweep] [--no-synthetic]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocessing.slide import WholeSlide  # noqa: E402
from preprocessing.synthetic import demo_scenes, make_demo_slides  # noqa: E402
from preprocessing.tiling import load_coords, tile_slide  # noqa: E402

OUT = REPO / "benchmarks" / "out"
SLIDES = REPO.parent / "shared" / "slides"
REAL = [("CMU-1-Small-Region", SLIDES / "CMU-1-Small-Region.svs", None),
        ("TCGA-CR-7395 (0.25 µm/px)", SLIDES / "tcga-cr-7395-01a-01-ts1.svs", 0.25)]
GRID_MPP = 8.0
TISSUE_SATURATION = 8
OLD_DEFAULT = dict(geometry="clam", sthresh=-1, median_kernel=7, min_tissue_area_um2=20_000, min_tissue_fraction=0.5,
                   use_padding=False)
METHODS = {
    "default": {},
    "clam": dict(preset="clam"),
    "clam a_t=1": dict(preset="clam", min_tissue_area_um2=1),
    "trident": dict(preset="trident"),
    "old default": OLD_DEFAULT,
}
SWEEP = {
    f"fraction {f:g}, area {a:g} µm², median {m}": dict(min_tissue_fraction=f, min_tissue_area_um2=a, median_kernel=m)
    for m in (7, 5) for a in (20_000, 5_000, 1_000) for f in (0.5, 0.25, 0.1, 0.05, 0.0)
}


def reference_tissue(slide: Path, mpp: float | None) -> np.ndarray:
    """The plain saturation threshold described in the module docstring, on the 8 µm/px grid."""
    with WholeSlide(slide, mpp_override=mpp) as ws:
        sat = cv2.cvtColor(ws.thumbnail_at_mpp(GRID_MPP), cv2.COLOR_RGB2HSV)[:, :, 1]
    return sat > TISSUE_SATURATION


def coverage(coords: np.ndarray, patch_level0: float, level0_size: tuple[int, int], grid_shape: tuple[int, int],
             pad: int) -> np.ndarray:
    """Grid pixels whose centre lies in a kept patch, on the grid padded by `pad` pixels on every side."""
    h, w = grid_shape
    sx, sy = level0_size[0] / w, level0_size[1] / h
    covered = np.zeros((h + 2 * pad, w + 2 * pad), bool)
    for x, y in coords:
        # pixel i's centre is at (i + 0.5) s: it is in [x, x + P) for i in [ceil(x/s - .5), ceil((x+P)/s - .5))
        i0, i1 = math.ceil(x / sx - 0.5), math.ceil((x + patch_level0) / sx - 0.5)
        j0, j1 = math.ceil(y / sy - 0.5), math.ceil((y + patch_level0) / sy - 0.5)
        covered[j0 + pad: j1 + pad, i0 + pad: i1 + pad] = True
    return covered


def measure(slide: Path, mpp: float | None, tissue: np.ndarray, method: dict, work: Path) -> tuple[float, float, int]:
    """(recall, background share, number of patches) of one tiling method on one slide."""
    coords, attrs = load_coords(tile_slide(slide, work, target_mpp=0.5, patch_size=224, mpp=mpp, **method))
    size0 = float(np.max(attrs["patch_size_level0_xy"]))
    with WholeSlide(slide, mpp_override=mpp) as ws:
        level0 = ws.dimensions
    pad = math.ceil(size0 / (level0[0] / tissue.shape[1])) + 1
    covered = coverage(coords, size0, level0, tissue.shape, pad)
    truth = np.zeros_like(covered)
    truth[pad: pad + tissue.shape[0], pad: pad + tissue.shape[1]] = tissue
    n_covered = covered.sum()
    recall = (covered & truth).sum() / max(truth.sum(), 1)
    background = (covered & ~truth).sum() / max(n_covered, 1)
    return float(recall), float(background), len(coords)


def synthetic_cohort() -> list[tuple[str, Path, np.ndarray]]:
    """The demo cohort as config.yaml makes it (27 slides, 3072² px at 0.25 µm/px) with its true tissue."""
    folder = OUT / "demo_slides"
    make_demo_slides(folder, train_per_class=6, test_per_class=3, size=3072, seed=0)
    cohort = []
    for slide_id, _, scene in demo_scenes(6, 3, 3072, seed=0):
        side = math.ceil(3072 * 0.25 / GRID_MPP)
        ds = 3072 / side
        cohort.append((slide_id, folder / f"{slide_id}.svs", scene.tissue(0, 0, side, side, ds)))
    return cohort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also print the candidate keep rules for the default")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic demo cohort")
    args = parser.parse_args()
    methods = dict(METHODS, **(SWEEP if args.sweep else {}))
    work = Path(tempfile.mkdtemp(prefix="bench_tissue_"))
    print(f"{'slide':<28} {'method':<40} {'patches':>8} {'recall':>7} {'backgr.':>7}")
    for name, slide, mpp in REAL:
        if not slide.exists():
            print(f"(skipping {slide}: not found)")
            continue
        tissue = reference_tissue(slide, mpp)
        for label, method in methods.items():
            recall, background, n = measure(slide, mpp, tissue, method, work / label.replace(" ", "_"))
            print(f"{name:<28} {label:<40} {n:>8} {recall:>7.1%} {background:>7.1%}", flush=True)
    if not args.no_synthetic:
        cohort = synthetic_cohort()
        for label, method in methods.items():
            rows = [measure(path, None, tissue, method, work / "synthetic") for _, path, tissue in cohort]
            recall, background, n = (float(np.mean([r[i] for r in rows])) for i in range(3))
            print(f"{'synthetic cohort (mean of 27)':<28} {label:<40} {n:>8.1f} {recall:>7.1%} {background:>7.1%}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
