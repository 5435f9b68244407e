"""Tiling at a target µm/px on one global grid anchored at level-0 (0, 0).

Patch size and stride are given at the target resolution. A patch is kept when it lies inside the slide
and its tissue fraction on the mask is at least `min_tissue_fraction`; all fractions come from one
integral image, so the cost does not depend on how many patches there are per Python call. Coordinates
are level-0 top-left (x, y) in row-major order, written to a CLAM/TRIDENT-compatible H5 file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import h5py
import numpy as np

from preprocessing import __version__
from wsicore.cli import command_parser, log_to_stderr
from wsicore.errors import ConfigError, InputError
from wsicore.files import atomic_path, write_json
from wsicore.settings import add_arguments, given, setting
from preprocessing.overview import HOLE_RGB, PATCH_RGB, PATCH_TINT, TISSUE_RGB, load_overview, save_report_jpeg
from preprocessing.slide import SlideError, WholeSlide, slide_id_from_path
from preprocessing.stores import non_pixel_rows
from preprocessing.tissue import (
    SegmentationParams,
    TissueMask,
    add_segmentation_arguments,
    add_slide_arguments,
    load_tissue_polygons,
    make_params,
    params_from_args,
    preset_values,
    segment_slide_object,
    segmentation_paths,
    write_segmentation,
)

log = logging.getLogger("preprocessing.tiling")

# Patches are resampled from the scan; inventing more than this much resolution is refused.
MAX_UPSAMPLE = 2.0
TILING_RULES = ("fraction", "clam", "trident")
CLAM_CONTOUR_FNS = ("four_pt", "four_pt_hard", "center", "basic")


@dataclass
class TilingParams:
    """Tiling (config section `tiling`); sizes are in pixels at the target resolution."""

    target_mpp: float = setting(0.5, help="µm/px of the patches (0.5 ≈ 20x)", exclusive_minimum=0)
    patch_size: int = setting(224, help="patch side in px at target_mpp", minimum=1)
    stride: int | None = setting(None, help="grid step in px at target_mpp; null = patch_size (no overlap)", minimum=1)
    min_tissue_fraction: float = setting(
        0.15, minimum=0, maximum=1,
        help="fraction rule: keep a patch when at least this share of it is tissue on the mask (0 = any tissue); "
             "trident rule: TRIDENT's min_tissue_proportion")
    rule: str = setting(
        "fraction", choices=list(TILING_RULES),
        help="'fraction': one grid from level-0 (0, 0), tissue share on the mask; 'clam': CLAM's create_patches_fp "
             "(a grid per contour bounding box, contour_fn test, holes); 'trident': TRIDENT's grid from (0, 0) and "
             "any patch touching the (simplified) tissue polygons")
    contour_fn: str = setting(
        "four_pt", choices=list(CLAM_CONTOUR_FNS),
        help="clam rule: CLAM's contour check (four_pt: any of 4 points inside; four_pt_hard: all 4; center; "
             "basic: the top-left corner)")
    use_padding: bool = setting(
        True, help="patches may run past the slide edge, so tissue touching the edge is kept; the part past the "
                   "edge reads as background and counts as such in the tissue fraction (CLAM's use_padding; "
                   "TRIDENT always)")

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ConfigError(f"tiling.target_mpp must be > 0, got {self.target_mpp}")
        if self.patch_size < 1:
            raise ConfigError(f"tiling.patch_size must be >= 1, got {self.patch_size}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"tiling.stride must be >= 1, got {self.stride}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ConfigError(f"tiling.min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")
        if self.rule not in TILING_RULES:
            raise ConfigError(f"tiling.rule must be one of {TILING_RULES}, got {self.rule!r}")
        if self.contour_fn not in CLAM_CONTOUR_FNS:
            raise ConfigError(f"tiling.contour_fn must be one of {CLAM_CONTOUR_FNS}, got {self.contour_fn!r}")

    @property
    def step(self) -> int:
        return self.stride or self.patch_size


def make_tiling_params(preset: str | None = None, **overrides: object) -> TilingParams:
    """Tiling parameters from a preset name plus explicit overrides (None values are ignored)."""
    values = preset_values(preset, "tiling")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TilingParams(**values)


def trident_magnification(mpp: float) -> int:
    """TRIDENT's magnification for a level-0 pixel size (WSI._fetch_magnification's buckets)."""
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return mag
    raise ValueError(f"TRIDENT refuses a level-0 pixel size of {mpp:g} µm/px (>= 2.4)")


@dataclass
class PatchGeometry:
    """How one patch at the target resolution maps to level 0 and to the read level."""

    read_level: int
    read_downsample_xy: tuple[float, float]
    read_size: int  # px of one patch at the read level
    patch_size_level0_xy: tuple[float, float]  # level-0 extent (integers for the clam and trident rules)
    step_level0_xy: tuple[float, float]

    @classmethod
    def for_slide(cls, ws: WholeSlide, params: TilingParams) -> "PatchGeometry":
        if params.target_mpp < ws.mpp_x / MAX_UPSAMPLE:
            raise SlideError(
                f"slide {ws.slide_id}: target {params.target_mpp} µm/px is more than {MAX_UPSAMPLE:g}x finer than "
                f"the scan ({ws.mpp_x:.4g} µm/px at level 0); check the slide's µm/px (--mpp) or --target-mpp",
                config_hint="mpp_overrides, tiling.target_mpp")
        level = ws.best_level_for_mpp(params.target_mpp)
        dx, dy = ws.level_downsample_xy(level)
        size0 = (params.patch_size * params.target_mpp / ws.mpp_x, params.patch_size * params.target_mpp / ws.mpp_y)
        step0 = (params.step * params.target_mpp / ws.mpp_x, params.step * params.target_mpp / ws.mpp_y)
        read_size = max(1, round(size0[0] / dx))
        if params.rule == "clam":
            # CLAM: patch_size and step_size px at patch_level, times int(level downsample) at level 0
            read_step = max(1, round(step0[0] / dx))
            size0 = (read_size * int(dx), read_size * int(dy))
            step0 = (read_step * int(dx), read_step * int(dy))
        elif params.rule == "trident":
            # TRIDENT: level-0 sizes from magnifications (10 / mpp buckets), rounded to whole pixels
            try:
                downsample = params.target_mpp / (10 / trident_magnification(ws.mpp_x))
            except ValueError as exc:
                raise SlideError(f"slide {ws.slide_id}: {exc}; use another tiling rule") from exc
            side = round(params.patch_size * downsample)
            step = side - round((params.patch_size - params.step) * downsample)
            size0, step0 = (side, side), (step, step)
            read_size = max(1, round(side / dx))
        return cls(level, (dx, dy), read_size, size0, step0)


def grid_coords(level0_size: tuple[int, int], geom: PatchGeometry, pad_edges: bool = False) -> np.ndarray:
    """Grid positions (x, y), row-major: those whose patch lies fully inside the slide, or with `pad_edges`
    every position that starts inside it (the last row and column then run past the edge)."""
    w0, h0 = level0_size
    sx, sy = geom.step_level0_xy
    pw, ph = geom.patch_size_level0_xy
    if pad_edges:
        nx, ny = math.ceil(w0 / sx), math.ceil(h0 / sy)
    else:
        nx = max(0, math.floor((w0 - pw) / sx) + 1) if w0 >= pw else 0
        ny = max(0, math.floor((h0 - ph) / sy) + 1) if h0 >= ph else 0
    xs = np.round(np.arange(nx) * sx).astype(np.int64)
    ys = np.round(np.arange(ny) * sy).astype(np.int64)
    if pad_edges:
        xs, ys = xs[xs < w0], ys[ys < h0]
    else:
        xs = xs[xs + math.ceil(pw) <= w0 + 1]  # rounding must not push a patch past the edge
        ys = ys[ys + math.ceil(ph) <= h0 + 1]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_fractions(tissue: TissueMask, coords: np.ndarray, patch_size_level0_xy: tuple[float, float]) -> np.ndarray:
    """Fraction of each patch's footprint covered by tissue, from an integral image of the mask.

    The part of a patch beyond the slide counts as background.
    """
    if len(coords) == 0:
        return np.zeros(0, np.float64)
    scale_x, scale_y = tissue.scale_xy
    h, w = tissue.mask.shape
    integral = cv2.integral(tissue.mask.astype(np.uint8), sdepth=cv2.CV_64F)
    x0 = np.round(coords[:, 0] / scale_x).astype(np.int64)
    y0 = np.round(coords[:, 1] / scale_y).astype(np.int64)
    x1 = np.maximum(np.round((coords[:, 0] + patch_size_level0_xy[0]) / scale_x).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round((coords[:, 1] + patch_size_level0_xy[1]) / scale_y).astype(np.int64), y0 + 1)
    area = (x1 - x0) * (y1 - y0)
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return covered / area


def clam_contour_coords(
    polygons: list[tuple[np.ndarray, list[np.ndarray]]], geom: PatchGeometry, params: TilingParams,
    level0_size: tuple[int, int],
) -> np.ndarray:
    """CLAM's process_contours: per contour, a grid from its bounding box; keep a position when the contour
    check passes and the patch centre is not inside one of the contour's holes. CLAM's order (contour by
    contour, x-major within a contour); a patch may appear twice when bounding boxes overlap, as in CLAM."""
    ref_w, ref_h = (int(v) for v in geom.patch_size_level0_xy)
    step_x, step_y = (int(v) for v in geom.step_level0_xy)
    ref = ref_w  # CLAM checks contours with the x patch size on both axes
    half, shift = ref // 2, int(ref // 2 * 0.5)
    if params.contour_fn in ("four_pt", "four_pt_hard") and shift > 0:
        offsets = [(-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift)]
    elif params.contour_fn == "basic":
        offsets = [(-half, -half)]
    else:
        offsets = [(0, 0)]
    need_all = params.contour_fn == "four_pt_hard"
    w0, h0 = level0_size
    kept: list[tuple[int, int]] = []
    for outer, holes in polygons:
        contour = outer.astype(np.int32).reshape(-1, 1, 2)
        hole_contours = [h.astype(np.int32).reshape(-1, 1, 2) for h in holes]
        start_x, start_y, w, h = cv2.boundingRect(contour)
        stop_x, stop_y = start_x + w, start_y + h
        if not params.use_padding:
            stop_x, stop_y = min(stop_x, w0 - ref_w + 1), min(stop_y, h0 - ref_h + 1)
        for x in range(start_x, stop_x, step_x):
            for y in range(start_y, stop_y, step_y):
                cx, cy = x + half, y + half
                inside = [cv2.pointPolygonTest(contour, (float(cx + ox), float(cy + oy)), False) >= 0
                          for ox, oy in offsets]
                if not (all(inside) if need_all else any(inside)):
                    continue
                centre = (x + ref / 2, y + ref / 2)
                if any(cv2.pointPolygonTest(hc, centre, False) > 0 for hc in hole_contours):
                    continue
                kept.append((x, y))
    return np.asarray(kept, np.int64).reshape(-1, 2)


def trident_coords(
    polygons: list[tuple[np.ndarray, list[np.ndarray]]], geom: PatchGeometry, params: TilingParams,
    level0_size: tuple[int, int],
) -> np.ndarray:
    """TRIDENT's WSIPatcher: a grid from (0, 0) over every x < width, y < height (patches may run past the
    edge), row-major; keep a patch that intersects the tissue polygons simplified with a tolerance of
    patch_size / 4 (TRIDENT's), or, with min_tissue_fraction > 0, whose overlap is at least that share."""
    import shapely

    step = int(geom.step_level0_xy[0])
    side = int(geom.patch_size_level0_xy[0])
    w0, h0 = level0_size
    xs = np.arange(0, math.ceil(w0 / step), dtype=np.int64) * step
    ys = np.arange(0, math.ceil(h0 / step), dtype=np.int64) * step
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1)
    if not polygons or len(coords) == 0:
        return coords[:0]
    shapes = [shapely.Polygon(outer, holes) for outer, holes in polygons]
    simplified = shapely.simplify(np.asarray(shapes, dtype=object), params.patch_size / 4, preserve_topology=True)
    tissue = shapely.union_all(simplified)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + side, coords[:, 1] + side)
    shapely.prepare(tissue)
    if params.min_tissue_fraction == 0:
        keep = shapely.intersects(boxes, tissue)
    else:
        keep = shapely.area(shapely.intersection(boxes, tissue)) >= params.min_tissue_fraction * shapely.area(boxes)
    return coords[keep]


def patches_on_tissue(
    ws: WholeSlide, tissue: TissueMask, params: TilingParams,
    polygons: list[tuple[np.ndarray, list[np.ndarray]]] | None = None,
) -> tuple[np.ndarray, np.ndarray, PatchGeometry]:
    """Coordinates (N, 2) of the patches `params.rule` keeps, their tissue fractions on the mask, and the geometry.

    The clam and trident rules test the tissue polygons (`polygons`, level-0, as in the segmentation GeoJSON).
    """
    geom = PatchGeometry.for_slide(ws, params)
    if params.rule == "fraction":
        coords = grid_coords(ws.dimensions, geom, pad_edges=params.use_padding)
        frac = tissue_fractions(tissue, coords, geom.patch_size_level0_xy)
        keep = frac >= params.min_tissue_fraction if params.min_tissue_fraction > 0 else frac > 0
        return coords[keep], frac[keep], geom
    if polygons is None:
        raise ValueError(f"tiling rule {params.rule!r} needs the tissue polygons")
    place = clam_contour_coords if params.rule == "clam" else trident_coords
    coords = place(polygons, geom, params, ws.dimensions)
    return coords, tissue_fractions(tissue, coords, geom.patch_size_level0_xy), geom


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
        "tiling_rule": params.rule,
        "slide_id": ws.slide_id,
        "name": ws.slide_id,
        # which slide file the coords belong to (checked by extraction; the id alone can be renamed)
        "slide_quickhash": ws.properties.get("openslide.quickhash-1", ""),
        "level0_width": int(ws.dimensions[0]),
        "level0_height": int(ws.dimensions[1]),
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
    try:
        f = h5py.File(h5_path, "r")
    except OSError as exc:
        raise InputError(f"{h5_path}: not a readable HDF5 coords file ({exc}); run tiling again") from exc
    with f:
        if "coords" not in f:
            raise InputError(f"{h5_path}: no `coords` dataset (not a coordinates file)")
        dset = f["coords"]
        if not isinstance(dset, h5py.Dataset) or dset.dtype.kind not in "iuf":
            raise InputError(f"{h5_path}: `coords` holds {getattr(dset, 'dtype', 'a group')}, not numbers (not a coordinates "
                             f"file); run tiling again")
        if dset.size and (dset.ndim != 2 or dset.shape[1] != 2):
            raise InputError(f"{h5_path}: `coords` has shape {dset.shape}, not (N, 2) level-0 x, y pairs "
                             f"(not a coordinates file); run tiling again")
        raw = dset[:]
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dset.attrs.items()}
    bad = non_pixel_rows(raw) if raw.dtype.kind == "f" else []  # CLAM, TRIDENT and we write integers
    if len(bad):  # a float that is not one is never rounded
        raise InputError(f"{h5_path}: `coords` holds values that are not finite, whole level-0 pixels at {len(bad)} "
                         f"row(s) (row {bad[0]}: {raw.reshape(len(raw), -1)[bad[0]].tolist()}); run tiling again")
    coords = raw.astype(np.int64).reshape(-1, 2)
    for key in ("status", "slide_id", "name", "software"):
        if isinstance(attrs.get(key), bytes):
            attrs[key] = attrs[key].decode()
    return coords, attrs


def check_coords_slide(coords_attrs: dict, ws: WholeSlide, coords_path: str | Path) -> None:
    """Refuse coords made from another slide file than `ws`: tiling records the slide's OpenSlide
    quickhash and level-0 size. Coords files without the quickhash (older ones, CLAM's, TRIDENT's) are
    checked by the dimensions they record and accepted with a warning."""
    made = coords_attrs.get("slide_quickhash") or ""
    here = ws.properties.get("openslide.quickhash-1", "")
    level = int(coords_attrs.get("read_level", coords_attrs.get("patch_level", 0)) or 0)
    checks = [("level-0 size", (coords_attrs.get("level0_width"), coords_attrs.get("level0_height")), ws.dimensions)]
    level_dim = np.ravel(coords_attrs.get("level_dim", []))  # CLAM's attribute: size of the patch level
    if len(level_dim) == 2 and level < ws.level_count:
        checks.append((f"level-{level} size", tuple(level_dim), ws.level_dimensions[level]))
    differ = [f"{what} {'x'.join(map(str, want))} vs {'x'.join(map(str, got))}" for what, want, got in checks
              if None not in want and tuple(int(v) for v in want) != tuple(got)]
    differ = list(dict.fromkeys(differ))  # at level 0, CLAM's level_dim is the level-0 size again
    if made and here and made != here:
        differ.insert(0, f"OpenSlide quickhash {made[:12]}... vs {here[:12]}...")
    if differ:
        raise SlideError(f"{coords_path} was made from slide {coords_attrs.get('slide_id') or '?'}, not from {ws.path} "
                         f"({'; '.join(differ)}); pass the slide the coords were made from, or tile {ws.path} first")
    if not made:
        log.warning("%s records no slide identity (written by an older version, CLAM or TRIDENT); only its "
                    "dimensions were checked against %s", coords_path, ws.path)


def draw_patches(thumbnail_overlay: np.ndarray, coords: np.ndarray, level0_size: tuple[int, int],
                 patch_size_level0_xy: tuple[float, float]) -> np.ndarray:
    """Kept patches on the segmentation overlay (for the report): tinted, and outlined one by one when a patch
    is at least 6 px wide in the overview; smaller ones would merge into a grid, so then the kept area's
    outline is drawn instead."""
    img = thumbnail_overlay.copy()
    sx = img.shape[1] / level0_size[0]
    sy = img.shape[0] / level0_size[1]
    boxes = [(int(x * sx), int(y * sy), int((x + patch_size_level0_xy[0]) * sx) - 1,
              int((y + patch_size_level0_xy[1]) * sy) - 1) for x, y in coords]
    kept = np.zeros(img.shape[:2], np.uint8)
    for x0, y0, x1, y1 in boxes:
        kept[max(y0, 0): y1 + 1, max(x0, 0): x1 + 1] = 1
    tint = kept.astype(bool)
    img[tint] = ((1 - PATCH_TINT) * img[tint] + PATCH_TINT * np.array(PATCH_RGB)).astype(np.uint8)
    if patch_size_level0_xy[0] * sx >= 6:
        for x0, y0, x1, y1 in boxes:
            cv2.rectangle(img, (x0, y0), (x1, y1), PATCH_RGB, 1)
    else:
        outline, _ = cv2.findContours(kept, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, outline, -1, PATCH_RGB, max(1, round(max(img.shape[:2]) / 500)))
    return img


def tile_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    preset: str | None = None,
    mpp: float | None = None,
    seg_dir: str | Path | None = None,
    **options: object,
) -> Path:
    """Segment (or reuse the mask in `seg_dir`) and tile one slide; returns `out_dir/<slide_id>.h5`.

    `options` are TilingParams and SegmentationParams fields by name; unset ones come from `preset` (or the
    preset recorded by the segmentation in `seg_dir`).
    """
    preset = preset or recorded_preset(seg_dir, slide_id_from_path(slide_path))
    tiling_names = {f.name for f in fields(TilingParams)}
    params = make_tiling_params(preset, **{k: v for k, v in options.items() if k in tiling_names})
    seg_params = make_params(preset, **{k: v for k, v in options.items() if k not in tiling_names})
    out_dir = Path(out_dir)
    with WholeSlide(slide_path, mpp_override=mpp) as ws:
        summary = run_tiling(ws, params, out_dir, seg_params, seg_dir, preset)
    return Path(summary["coords"])


def recorded_preset(seg_dir: str | Path | None, slide_id: str) -> str | None:
    """The preset a segmentation in `seg_dir` was made with (None without one), so tiling follows it."""
    if seg_dir is None:
        return None
    path = segmentation_paths(Path(seg_dir), slide_id)["json"]
    try:
        return json.loads(path.read_text()).get("preset")
    except (OSError, ValueError):
        return None


def check_segmentation_preset(seg_dir: str | Path, slide_id: str, preset: str | None) -> None:
    """Refuse tiling with a preset whose segmentation differs from the one `seg_dir` recorded: a preset sets both
    halves (CLAM's grid needs CLAM's contours), so a mix reproduces neither tool. A folder without a recorded
    segmentation (a mask and contours from elsewhere, e.g. TRIDENT's GeoJSON) is taken as it is."""
    if not segmentation_paths(Path(seg_dir), slide_id)["json"].is_file():
        return
    made = recorded_preset(seg_dir, slide_id)
    if preset_values(made, "segmentation") != preset_values(preset, "segmentation"):
        raise SlideError(
            f"slide {slide_id}: the segmentation in {seg_dir} was made with preset {made or 'default'!r}, not "
            f"{preset or 'default'!r}; segment with --preset {preset or 'default'} first, or leave out --preset "
            f"(tiling then follows the segmentation)")


def run_tiling(
    ws: WholeSlide, params: TilingParams, out_dir: Path, seg_params: SegmentationParams, seg_dir: str | Path | None,
    preset: str | None = None,
) -> dict:
    """Tiling of an open slide. Without `seg_dir`, segments first and writes those outputs to `out_dir`."""
    if not seg_params.allow_unusual_slide:
        ws.check_plausible()
    if seg_dir is not None:
        check_segmentation_preset(seg_dir, ws.slide_id, preset)
    else:
        # segment here; the outputs then sit in out_dir like those of `segment`
        result = segment_slide_object(ws, seg_params)
        write_segmentation(result, ws, seg_params, out_dir, preset)
        seg_dir = out_dir
    seg_paths = segmentation_paths(Path(seg_dir), ws.slide_id)
    if not seg_paths["mask"].is_file():
        raise InputError(f"slide {ws.slide_id}: no tissue mask {seg_paths['mask']} in --seg-dir {seg_dir}; run "
                         "`python -m preprocessing segment` for it first (or tile without --seg-dir)")
    tissue = TissueMask.load_png(seg_paths["mask"])
    if tissue.level0_size != ws.dimensions:
        raise SlideError(f"slide {ws.slide_id}: mask {seg_paths['mask']} is for a {tissue.level0_size} slide, "
                         f"this slide is {ws.dimensions}")
    polygons = load_tissue_polygons(seg_paths["geojson"]) if params.rule != "fraction" else None
    # the contour overview written by segmentation, so the slide is not read a second time for it
    overlay = load_overview(seg_paths["thumbnail"])
    t0 = time.perf_counter()
    coords, fractions, geom = patches_on_tissue(ws, tissue, params, polygons)
    log.info("slide %s: %d patch(es) of %d px at %g µm/px kept (rule %s, read level %d) in %.1f s", ws.slide_id,
             len(coords), params.patch_size, params.target_mpp, params.rule, geom.read_level, time.perf_counter() - t0)
    status = "ok" if len(coords) else "no_tissue"
    h5_path = out_dir / f"{ws.slide_id}.h5"
    write_coords_h5(h5_path, coords, fractions, coords_attrs(ws, params, geom, status))
    legend = [("tissue", TISSUE_RGB, "line"), ("holes", HOLE_RGB, "line"),
              (f"kept patches ({len(coords):,})", PATCH_RGB, "box")]
    caption = (f"{ws.slide_id} · {ws.mpp_x:.3g} µm/px · {len(coords):,} patches of {params.patch_size} px at "
               f"{params.target_mpp:g} µm/px")
    save_report_jpeg(draw_patches(overlay, coords, ws.dimensions, geom.patch_size_level0_xy),
                     ws.dimensions[0] * ws.mpp_x / overlay.shape[1], legend, caption,
                     out_dir / f"{ws.slide_id}_patches.jpg")
    summary = {
        "slide_id": ws.slide_id,
        "status": status,
        "n_patches": int(len(coords)),
        "coords": str(h5_path),
        "read_level": geom.read_level,
        "read_size": geom.read_size,
        "patch_size_level0_xy": list(geom.patch_size_level0_xy),
        "params": asdict(params),
        "preset": preset,
        "mpp_level0": list(ws.mpp_xy),
        "software": f"preprocessing {__version__}",
    }
    write_json(out_dir / f"{ws.slide_id}_tiling.json", summary)
    return summary


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
    log_to_stderr()
    slide_id = args.slide_id or slide_id_from_path(args.slide)
    preset = getattr(args, "preset", None) or recorded_preset(args.seg_dir, slide_id)
    args.preset = preset
    params = make_tiling_params(preset, **given(TilingParams, args))
    seg_params = params_from_args(args)
    with WholeSlide(args.slide, mpp_override=args.mpp, slide_id=args.slide_id) as ws:
        summary = run_tiling(ws, params, Path(args.out), seg_params, args.seg_dir, preset)
    print(json.dumps({k: summary[k] for k in ("slide_id", "status", "n_patches", "read_level", "read_size")}))
    return 0
