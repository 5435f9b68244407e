"""Tiling at a target µm/px on one global grid anchored at level-0 (0, 0).

Patch size and stride are given at the target resolution. A patch is kept when it lies inside the slide
and its tissue fraction on the mask is at least `min_tissue_fraction`; all fractions come from one
integral image, so the cost does not depend on how many patches there are per Python call. Coordinates
are level-0 top-left (x, y) in row-major order, written to a CLAM/TRIDENT-compatible H5 file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np

from preprocessing import __version__
from wsicore.cli import command_parser
from wsicore.files import atomic_path, write_json
from wsicore.settings import add_arguments, from_arguments, setting
from preprocessing.slide import SlideError, WholeSlide
from preprocessing.tissue import (
    SegmentationParams,
    TissueMask,
    add_segmentation_arguments,
    add_slide_arguments,
    make_params,
    params_from_args,
    save_rgb_png,
    segment_slide_object,
    segmentation_paths,
    write_segmentation,
)

# Patches are resampled from the scan; inventing more than this much resolution is refused.
MAX_UPSAMPLE = 2.0


@dataclass
class TilingParams:
    """Tiling (config section `tiling`); sizes are in pixels at the target resolution."""

    target_mpp: float = setting(0.5, help="µm/px of the patches (0.5 ≈ 20x)", exclusive_minimum=0)
    patch_size: int = setting(224, help="patch side in px at target_mpp", minimum=1)
    stride: int | None = setting(None, help="grid step in px at target_mpp; null = patch_size (no overlap)", minimum=1)
    min_tissue_fraction: float = setting(
        0.5, help="keep a patch when at least this fraction of it is tissue (0: any tissue)", minimum=0, maximum=1)

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"tiling.target_mpp must be > 0, got {self.target_mpp}")
        if self.patch_size < 1:
            raise ValueError(f"tiling.patch_size must be >= 1, got {self.patch_size}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"tiling.min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")

    @property
    def step(self) -> int:
        return self.stride or self.patch_size


@dataclass
class PatchGeometry:
    """How one patch at the target resolution maps to level 0 and to the read level."""

    read_level: int
    read_downsample_xy: tuple[float, float]
    read_size: int  # px of one patch at the read level
    patch_size_level0_xy: tuple[float, float]  # exact level-0 extent (float)
    step_level0_xy: tuple[float, float]

    @classmethod
    def for_slide(cls, ws: WholeSlide, params: TilingParams) -> "PatchGeometry":
        if params.target_mpp < ws.mpp_x / MAX_UPSAMPLE:
            raise SlideError(
                f"slide {ws.slide_id}: target {params.target_mpp} µm/px is more than {MAX_UPSAMPLE:g}x finer than "
                f"the scan ({ws.mpp_x:.4g} µm/px at level 0); check the slide's mpp (config key mpp_overrides) "
                f"or tiling.target_mpp"
            )
        level = ws.best_level_for_mpp(params.target_mpp)
        dx, dy = ws.level_downsample_xy(level)
        size0 = (params.patch_size * params.target_mpp / ws.mpp_x, params.patch_size * params.target_mpp / ws.mpp_y)
        step0 = (params.step * params.target_mpp / ws.mpp_x, params.step * params.target_mpp / ws.mpp_y)
        read_size = max(1, round(size0[0] / dx))
        return cls(level, (dx, dy), read_size, size0, step0)


def grid_coords(level0_size: tuple[int, int], geom: PatchGeometry) -> np.ndarray:
    """All grid positions (x, y) whose patch lies fully inside the slide, row-major."""
    w0, h0 = level0_size
    sx, sy = geom.step_level0_xy
    pw, ph = geom.patch_size_level0_xy
    nx = max(0, math.floor((w0 - pw) / sx) + 1) if w0 >= pw else 0
    ny = max(0, math.floor((h0 - ph) / sy) + 1) if h0 >= ph else 0
    xs = np.round(np.arange(nx) * sx).astype(np.int64)
    ys = np.round(np.arange(ny) * sy).astype(np.int64)
    xs = xs[xs + math.ceil(pw) <= w0 + 1]  # rounding must not push a patch past the edge
    ys = ys[ys + math.ceil(ph) <= h0 + 1]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_fractions(tissue: TissueMask, coords: np.ndarray, patch_size_level0_xy: tuple[float, float]) -> np.ndarray:
    """Fraction of each patch's footprint covered by tissue, from an integral image of the mask."""
    if len(coords) == 0:
        return np.zeros(0, np.float64)
    scale_x, scale_y = tissue.scale_xy
    h, w = tissue.mask.shape
    integral = cv2.integral(tissue.mask.astype(np.uint8), sdepth=cv2.CV_64F)
    x0 = np.clip(np.round(coords[:, 0] / scale_x).astype(np.int64), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / scale_y).astype(np.int64), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + patch_size_level0_xy[0]) / scale_x).astype(np.int64), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + patch_size_level0_xy[1]) / scale_y).astype(np.int64), 0, h)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    area = (x1 - x0) * (y1 - y0)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return np.where(area > 0, covered / np.maximum(area, 1), 0.0)


def select_patches(ws: WholeSlide, tissue: TissueMask, params: TilingParams) -> tuple[np.ndarray, np.ndarray, PatchGeometry]:
    """Kept coords (N, 2), their tissue fractions, and the patch geometry."""
    geom = PatchGeometry.for_slide(ws, params)
    coords = grid_coords(ws.dimensions, geom)
    frac = tissue_fractions(tissue, coords, geom.patch_size_level0_xy)
    keep = frac >= params.min_tissue_fraction if params.min_tissue_fraction > 0 else frac > 0
    return coords[keep], frac[keep], geom


def coords_attrs(ws: WholeSlide, params: TilingParams, geom: PatchGeometry, status: str) -> dict:
    """Attributes CLAM, TRIDENT and our extractor read, plus the physical facts behind them."""
    objective = ws.objective_power or 10.0 / ws.mpp_x
    return {
        "patch_size": params.patch_size,
        "patch_level": geom.read_level,
        "downsample": np.asarray(geom.read_downsample_xy, np.float64),
        "downsampled_level_dim": np.asarray(ws.level_dimensions[geom.read_level], np.int64),
        "level_dim": np.asarray(ws.level_dimensions[geom.read_level], np.int64),
        "patch_size_level0": int(round(geom.patch_size_level0_xy[0])),
        "patch_size_level0_xy": np.asarray(geom.patch_size_level0_xy, np.float64),
        "level0_magnification": float(objective),
        "target_magnification": float(objective * ws.mpp_x / params.target_mpp),
        "mpp_level0": float(ws.mpp_x),
        "mpp_level0_xy": np.asarray(ws.mpp_xy, np.float64),
        "target_mpp": float(params.target_mpp),
        "stride": int(params.step),
        "overlap": int(params.patch_size - params.step),
        "read_level": geom.read_level,
        "read_size": geom.read_size,
        "read_downsample_xy": np.asarray(geom.read_downsample_xy, np.float64),
        "min_tissue_fraction": float(params.min_tissue_fraction),
        "slide_id": ws.slide_id,
        "name": ws.slide_id,
        "status": status,
        "software": f"preprocessing {__version__}",
    }


def write_coords_h5(path: Path, coords: np.ndarray, fractions: np.ndarray, attrs: dict) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            dset = f.create_dataset("coords", data=coords.astype(np.int64).reshape(-1, 2))
            for key, value in attrs.items():
                dset.attrs[key] = value
            f.create_dataset("tissue_fraction", data=fractions.astype(np.float32))


def load_coords(h5_path: str | Path) -> tuple[np.ndarray, dict]:
    """Coordinates (N, 2) int64 and the attributes of a coords file."""
    with h5py.File(h5_path, "r") as f:
        if "coords" not in f:
            raise ValueError(f"{h5_path}: no `coords` dataset (not a coordinates file)")
        coords = f["coords"][:].astype(np.int64).reshape(-1, 2)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f["coords"].attrs.items()}
    for key in ("status", "slide_id", "name", "software"):
        if isinstance(attrs.get(key), bytes):
            attrs[key] = attrs[key].decode()
    return coords, attrs


def draw_patches(thumbnail_overlay: np.ndarray, coords: np.ndarray, level0_size: tuple[int, int],
                 patch_size_level0_xy: tuple[float, float]) -> np.ndarray:
    """Kept patches as rectangles on the segmentation overlay (for the report)."""
    img = thumbnail_overlay.copy()
    sx = img.shape[1] / level0_size[0]
    sy = img.shape[0] / level0_size[1]
    for x, y in coords:
        p0 = (int(x * sx), int(y * sy))
        p1 = (int((x + patch_size_level0_xy[0]) * sx), int((y + patch_size_level0_xy[1]) * sy))
        cv2.rectangle(img, p0, p1, (230, 120, 0), 1)
    return img


def tile_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    target_mpp: float = 0.5,
    patch_size: int = 224,
    min_tissue_fraction: float = 0.5,
    preset: str | None = None,
    mpp: float | None = None,
    stride: int | None = None,
    seg_dir: str | Path | None = None,
    **seg_params: object,
) -> Path:
    """Segment (or reuse the mask in `seg_dir`) and tile one slide; returns `out_dir/<slide_id>.h5`."""
    params = TilingParams(target_mpp, patch_size, stride, min_tissue_fraction)
    out_dir = Path(out_dir)
    with WholeSlide(slide_path, mpp_override=mpp) as ws:
        summary = run_tiling(ws, params, out_dir, make_params(preset, **seg_params), seg_dir)
    return Path(summary["coords"])


def run_tiling(
    ws: WholeSlide, params: TilingParams, out_dir: Path, seg_params: SegmentationParams, seg_dir: str | Path | None
) -> dict:
    """Tiling of an open slide. Without `seg_dir`, segments first and writes those outputs to `out_dir`."""
    if seg_dir is None:
        # segment here; the outputs then sit in out_dir like those of `segment`
        result = segment_slide_object(ws, seg_params)
        write_segmentation(result, ws, seg_params, out_dir)
        seg_dir = out_dir
    seg_paths = segmentation_paths(Path(seg_dir), ws.slide_id)
    tissue = TissueMask.load_png(seg_paths["mask"])
    if tissue.level0_size != ws.dimensions:
        raise SlideError(f"slide {ws.slide_id}: mask {seg_paths['mask']} is for a {tissue.level0_size} slide, "
                         f"this slide is {ws.dimensions}")
    # the contour overview written by segmentation, so the slide is not read a second time for it
    overlay = _load_rgb(seg_paths["thumbnail"])
    coords, fractions, geom = select_patches(ws, tissue, params)
    status = "ok" if len(coords) else "no_tissue"
    h5_path = out_dir / f"{ws.slide_id}.h5"
    write_coords_h5(h5_path, coords, fractions, coords_attrs(ws, params, geom, status))
    save_rgb_png(draw_patches(overlay, coords, ws.dimensions, geom.patch_size_level0_xy),
                 out_dir / f"{ws.slide_id}_patches.png")
    summary = {
        "slide_id": ws.slide_id,
        "status": status,
        "n_patches": int(len(coords)),
        "coords": str(h5_path),
        "read_level": geom.read_level,
        "read_size": geom.read_size,
        "patch_size_level0_xy": list(geom.patch_size_level0_xy),
        "params": asdict(params),
        "mpp_level0": list(ws.mpp_xy),
        "software": f"preprocessing {__version__}",
    }
    write_json(out_dir / f"{ws.slide_id}_tiling.json", summary)
    return summary


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m preprocessing tile", __doc__,
                            "python -m preprocessing tile --slide S.svs --out patches/ --seg-dir seg/ --target-mpp 0.5")
    add_slide_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for <slide_id>.h5 and images")
    parser.add_argument("--seg-dir", help="reuse the tissue mask written by `segment` into this folder "
                                          "(default: segment here, with the segmentation flags)")
    add_arguments(parser.add_argument_group("tiling (config section `tiling`)"), TilingParams)
    add_segmentation_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = from_arguments(TilingParams, args)
        seg_params = params_from_args(args)
        with WholeSlide(args.slide, mpp_override=args.mpp, slide_id=args.slide_id) as ws:
            summary = run_tiling(ws, params, Path(args.out), seg_params, args.seg_dir)
    except (SlideError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("slide_id", "status", "n_patches", "read_level", "read_size")}))
    return 0
