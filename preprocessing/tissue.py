"""Tissue segmentation on a coarse thumbnail, with thresholds in physical units.

Saturation (HSV) -> median blur -> Otsu or fixed threshold -> morphological closing -> contours with
tissue and hole area filters (µm²), keeping the largest holes up to a limit. The whole slide is never
loaded: the thumbnail (about 8 µm/px) is read in bounded pieces.

Outputs per slide: `<id>_mask.png` (its µm/px in PNG text chunks and in the JSON), `<id>_thumbnail.png`
(contours and holes drawn, with a legend and a scale bar, for humans), `<id>.geojson` (polygons in level-0 pixels; QuPath opens it) and
`<id>_segmentation.json` (parameters, status, areas).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from preprocessing import __version__
from wsicore.cli import command_parser, log_to_stderr
from wsicore.errors import ConfigError, InputError
from wsicore.files import atomic_path, write_json
from wsicore.settings import add_arguments, given, setting
from preprocessing.overview import HOLE_RGB, TISSUE_RGB, annotate, save_annotated_png
from preprocessing.slide import SlideError, UnusualSlideError, WholeSlide

log = logging.getLogger("preprocessing.tissue")

# CLAM expresses areas in multiples of a 512x512 level-0 patch ("ref_patch_size").
CLAM_REF_PATCH = 512
# CLAM's seg_level = -1: the level OpenSlide picks for this downsample.
CLAM_SEG_DOWNSAMPLE = 64
# Largest segmentation image (pixels) read without --allow-unusual-slide: CLAM's own limit (1e8), ~300 MB RGB.
MAX_SEG_PIXELS = 100_000_000


@dataclass
class SegmentationParams:
    """Tissue segmentation (config section `segmentation`); kernel sizes are in segmentation-image pixels."""

    seg_mpp: float = setting(8.0, help="µm/px of the segmentation thumbnail", exclusive_minimum=0)
    seg_level: int | None = setting(
        None, minimum=-1,
        help="segment a whole pyramid level as stored instead of a seg_mpp thumbnail: a level index, or -1 for "
             "CLAM's choice (the level OpenSlide picks for a 64x downsample)")
    sthresh: int = setting(
        15, minimum=-1, maximum=255,
        help="fixed saturation threshold 0-255 (glass is below 5, faint stroma 15-50); -1 = Otsu, which on sections "
             "with much pale stroma splits stroma from epithelium instead of tissue from glass")
    min_saturation: int = setting(15, minimum=0, maximum=255,
                                  help="floor under the Otsu threshold, so blank glass yields no tissue")
    median_kernel: int = setting(5, minimum=1, odd=True, help="median blur of the saturation (odd, px)")
    close_kernel: int = setting(4, minimum=0, help="morphological closing kernel side (px); 0 = none")
    min_tissue_area_um2: float = setting(
        2_000.0, minimum=0, help="tissue regions smaller than this (net of holes) are dropped (unit: area_unit)")
    min_hole_area_um2: float = setting(10_000.0, minimum=0, help="holes smaller than this are filled (unit: area_unit)")
    max_n_holes: int = setting(8, minimum=0, help="largest holes kept per tissue region; 0 = holes are tissue")
    area_unit: str = setting(
        "um2", choices=["um2", "clam_ref_patch"],
        help="unit of the two areas: µm², or CLAM's 512x512 level-0 reference patches (its a_t, a_h)")
    geometry: str = setting(
        "centred", choices=["centred", "clam"],
        help="'centred': a shift-free closing and contour points at pixel centres; 'clam': CLAM's pixel geometry "
             "(OpenCV's default anchor for an even closing kernel, which moves the mask one pixel down-right, and "
             "contour points truncated to level 0), only to reproduce CLAM")
    allow_unusual_slide: bool = setting(
        False, help="process a slide whose pixel size or size is implausible (refused otherwise, before any pixel "
                    "is read)")

    def __post_init__(self) -> None:
        if self.area_unit not in {"um2", "clam_ref_patch"}:
            raise ConfigError(f"segmentation.area_unit must be 'um2' or 'clam_ref_patch', got {self.area_unit!r}")
        if self.geometry not in {"centred", "clam"}:
            raise ConfigError(f"segmentation.geometry must be 'centred' or 'clam', got {self.geometry!r}")
        if self.median_kernel < 1 or self.median_kernel % 2 == 0:
            raise ConfigError(f"segmentation.median_kernel must be a positive odd number, got {self.median_kernel}")


def _clam_preset(sthresh: int, mthresh: int, close: int, a_t: float, a_h: float, max_n_holes: int) -> dict:
    """A preset from one of CLAM's presets/*.csv rows (seg_level -1, use_otsu FALSE, four_pt, padding)."""
    return {
        "segmentation": dict(seg_level=-1, sthresh=sthresh, min_saturation=0, median_kernel=mthresh,
                             close_kernel=close, min_tissue_area_um2=a_t, min_hole_area_um2=a_h,
                             max_n_holes=max_n_holes, area_unit="clam_ref_patch", geometry="clam"),
        "tiling": dict(rule="clam", contour_fn="four_pt", use_padding=True),
    }


# Presets set segmentation and tiling together. `clam*` reproduce CLAM's create_patches_fp.py with the named
# presets/*.csv; `trident` reproduces TRIDENT's patching (any patch touching tissue, holes are tissue).
PRESETS: dict[str, dict[str, dict]] = {
    "default": {"segmentation": {}, "tiling": {}},
    "clam": _clam_preset(sthresh=8, mthresh=7, close=4, a_t=16, a_h=4, max_n_holes=8),  # presets/tcga.csv
    "clam_bwh_biopsy": _clam_preset(sthresh=15, mthresh=11, close=2, a_t=1, a_h=1, max_n_holes=2),
    "clam_bwh_resection": _clam_preset(sthresh=15, mthresh=11, close=4, a_t=100, a_h=16, max_n_holes=8),
    # TRIDENT segments with a network (HEST, GrandQC) we do not ship: our thresholding with holes as tissue
    # (TRIDENT's default), every value pinned here so the preset does not move with the defaults.
    "trident": {
        "segmentation": dict(seg_mpp=8.0, seg_level=None, sthresh=15, min_saturation=15, median_kernel=5,
                             close_kernel=4, min_tissue_area_um2=2_000.0, min_hole_area_um2=10_000.0, max_n_holes=0,
                             area_unit="um2", geometry="centred"),
        "tiling": dict(rule="trident", min_tissue_fraction=0.0),
    },
}
PRESETS["clam_tcga"] = PRESETS["clam"]  # the earlier name, kept as an alias


def preset_values(preset: str | None, section: str) -> dict:
    """The `section` ('segmentation' or 'tiling') values of a preset; {} for None."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return dict(PRESETS[preset or "default"][section])


def make_params(preset: str | None = None, **overrides: object) -> SegmentationParams:
    """Parameters from a preset name plus explicit overrides (None values are ignored)."""
    values = preset_values(preset, "segmentation")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SegmentationParams(**values)


@dataclass
class TissueMask:
    """A binary tissue mask on a coarse grid and how that grid maps to level 0."""

    mask: np.ndarray  # uint8 {0, 1}, (h, w)
    mpp_xy: tuple[float, float]  # µm per mask pixel
    level0_size: tuple[int, int]
    slide_id: str = ""

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Level-0 pixels per mask pixel."""
        return self.level0_size[0] / self.mask.shape[1], self.level0_size[1] / self.mask.shape[0]

    def save_png(self, path: Path) -> None:
        info = PngImagePlugin.PngInfo()
        for key, value in self._meta().items():
            info.add_text(key, str(value))
        with atomic_path(path) as tmp:
            Image.fromarray(self.mask * 255).save(tmp, format="PNG", pnginfo=info)

    def _meta(self) -> dict:
        return {
            "slide_id": self.slide_id,
            "mpp_x": self.mpp_xy[0],
            "mpp_y": self.mpp_xy[1],
            "level0_width": self.level0_size[0],
            "level0_height": self.level0_size[1],
        }

    @classmethod
    def load_png(cls, path: str | Path) -> "TissueMask":
        with Image.open(path) as im:
            text = dict(im.text)  # type: ignore[attr-defined]
            arr = (np.asarray(im.convert("L")) > 127).astype(np.uint8)
        try:
            return cls(
                arr,
                (float(text["mpp_x"]), float(text["mpp_y"])),
                (int(text["level0_width"]), int(text["level0_height"])),
                text.get("slide_id", ""),
            )
        except KeyError as exc:
            raise InputError(f"{path}: not a tissue mask written by this package (missing PNG text {exc}); run "
                             "`python -m preprocessing segment` again") from exc


@dataclass
class SegmentationResult:
    tissue: TissueMask
    outers: list[np.ndarray]  # contours in mask pixels, (k, 2) int
    holes: list[list[np.ndarray]]
    threshold: float
    thumbnail: np.ndarray
    geometry: str = "centred"  # how contour points map to level 0 (SegmentationParams.geometry)


def saturation_threshold(rgb: np.ndarray, params: SegmentationParams) -> tuple[np.ndarray, float]:
    """Binary foreground from HSV saturation: median blur, Otsu (floored) or a fixed threshold, closing."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    sat = cv2.medianBlur(sat, params.median_kernel)
    if params.sthresh < 0:  # Otsu
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thresh = max(float(otsu), float(params.min_saturation))
    else:
        thresh = float(max(params.sthresh, params.min_saturation))
    binary = (sat > thresh).astype(np.uint8)
    return close_mask(binary, params.close_kernel, params.geometry), thresh


def close_mask(binary: np.ndarray, kernel_size: int, geometry: str = "centred") -> np.ndarray:
    """Morphological closing with a square kernel that leaves the mask where it is.

    cv2.morphologyEx dilates and erodes with the same anchor; for an even kernel that anchor is off-centre and
    the result moves one pixel down-right. Eroding with the reflected anchor makes it a true closing (a square
    stays in place) for any kernel size. `geometry="clam"` keeps OpenCV's call as CLAM makes it.
    """
    if kernel_size <= 0:
        return binary
    kernel = np.ones((kernel_size, kernel_size), np.uint8)
    if geometry == "clam":
        return cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    anchor = kernel_size // 2
    dilated = cv2.dilate(binary, kernel, anchor=(anchor, anchor))
    reflected = kernel_size - 1 - anchor
    return cv2.erode(dilated, kernel, anchor=(reflected, reflected))


def filter_contours(
    binary: np.ndarray, min_tissue_px: float, min_hole_px: float, max_n_holes: int
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Outer contours whose area net of holes exceeds `min_tissue_px`; per outer, the largest holes
    (at most `max_n_holes`) whose area exceeds `min_hole_px`. Areas are in mask pixels (CLAM's rule)."""
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None or not contours:
        return [], []
    hierarchy = hierarchy[0]
    outers, holes = [], []
    for idx, (_, _, first_child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        children = []
        child = first_child
        while child != -1:
            children.append(contours[child])
            child = hierarchy[child][0]
        net_area = cv2.contourArea(contours[idx]) - sum(cv2.contourArea(c) for c in children)
        if net_area <= 0 or net_area <= min_tissue_px:
            continue
        children.sort(key=cv2.contourArea, reverse=True)
        kept = [c for c in children[:max_n_holes] if cv2.contourArea(c) > min_hole_px]
        outers.append(contours[idx])
        holes.append(kept)
    return outers, holes


def segment_array(
    thumbnail: np.ndarray, mpp_xy: tuple[float, float], level0_size: tuple[int, int], params: SegmentationParams,
    level0_mpp_xy: tuple[float, float], slide_id: str = "",
) -> SegmentationResult:
    """Segment an RGB thumbnail whose pixels measure `mpp_xy` µm."""
    binary, thresh = saturation_threshold(thumbnail, params)
    if params.area_unit == "clam_ref_patch":
        # CLAM: int(512² / (downsample_x * downsample_y)) mask pixels per reference patch
        scale_x, scale_y = level0_size[0] / binary.shape[1], level0_size[1] / binary.shape[0]
        unit_px = float(int(CLAM_REF_PATCH**2 / (scale_x * scale_y)))
    else:
        unit_px = 1.0 / (mpp_xy[0] * mpp_xy[1])
    min_tissue_px = params.min_tissue_area_um2 * unit_px
    min_hole_px = params.min_hole_area_um2 * unit_px
    outers, holes = filter_contours(binary, min_tissue_px, min_hole_px, params.max_n_holes)
    mask = np.zeros(binary.shape, np.uint8)
    if outers:
        cv2.drawContours(mask, outers, -1, 1, thickness=cv2.FILLED)
        kept_holes = [h for hole_list in holes for h in hole_list]
        if kept_holes:
            cv2.drawContours(mask, kept_holes, -1, 0, thickness=cv2.FILLED)
            # a hole's contour runs through the tissue pixels around it: give them back
            cv2.drawContours(mask, kept_holes, -1, 1, thickness=1)
    tissue = TissueMask(mask, mpp_xy, level0_size, slide_id)
    return SegmentationResult(tissue, outers, holes, thresh, thumbnail, params.geometry)


def segmentation_image(ws: WholeSlide, params: SegmentationParams) -> np.ndarray:
    """The RGB image segmentation works on: a seg_mpp thumbnail read in pieces, or a whole pyramid level.

    Its size is bounded (MAX_SEG_PIXELS) unless `allow_unusual_slide`, so a slide claiming an absurd size or pixel
    size cannot make segmentation allocate without limit.
    """
    w0, h0 = ws.dimensions
    if params.seg_level is not None:
        level = ws.best_level_for_downsample(CLAM_SEG_DOWNSAMPLE) if params.seg_level < 0 else params.seg_level
        if not 0 <= level < ws.level_count:
            raise SlideError(f"slide {ws.slide_id}: segmentation.seg_level {level} does not exist "
                             f"(the slide has levels 0-{ws.level_count - 1})")
        size = ws.level_dimensions[level]
        what = f"level {level} as stored"
    else:
        level = None
        size = (math.ceil(w0 * ws.mpp_x / params.seg_mpp), math.ceil(h0 * ws.mpp_y / params.seg_mpp))
        what = f"a thumbnail at seg_mpp {params.seg_mpp:g} µm/px"
    if size[0] * size[1] > MAX_SEG_PIXELS and not params.allow_unusual_slide:
        raise UnusualSlideError(
            f"slide {ws.slide_id}: segmenting {what} means a {size[0]} x {size[1]} px image, above the "
            f"{MAX_SEG_PIXELS / 1e6:g} Mpx limit; raise --seg-mpp (or choose a coarser --seg-level), "
            f"or pass --allow-unusual-slide",
            config_hint="segmentation.seg_mpp, segmentation.seg_level, segmentation.allow_unusual_slide")
    log.info("slide %s: %d x %d px at level 0, %.4g µm/px; segmenting %s (%d x %d px)", ws.slide_id, w0, h0,
             ws.mpp_x, what, size[0], size[1])
    return ws.read_level(level) if level is not None else ws.thumbnail_at_mpp(params.seg_mpp)


def segment_slide_object(ws: WholeSlide, params: SegmentationParams) -> SegmentationResult:
    """Segment an open slide (reads only a coarse image, in bounded pieces). Refuses implausible slides first."""
    if not params.allow_unusual_slide:
        ws.check_plausible()
    w0, h0 = ws.dimensions
    t0 = time.perf_counter()
    image = segmentation_image(ws, params)
    t1 = time.perf_counter()
    mpp_xy = (w0 * ws.mpp_x / image.shape[1], h0 * ws.mpp_y / image.shape[0])
    result = segment_array(image, mpp_xy, (w0, h0), params, ws.mpp_xy, ws.slide_id)
    log.info("slide %s: read in %.1f s, segmented in %.1f s: %d tissue region(s), %d hole(s), saturation threshold %s",
             ws.slide_id, t1 - t0, time.perf_counter() - t1, len(result.outers), sum(len(h) for h in result.holes),
             result.threshold)
    return result


def contours_to_level0(contours: list[np.ndarray], scale_xy: tuple[float, float], geometry: str) -> list[np.ndarray]:
    """Mask-pixel contours as level-0 (x, y) points, (k, 2) float64.

    'centred': a mask pixel i covers level-0 [i s, (i + 1) s), so its point is its centre (i + 0.5) s.
    'clam': CLAM's int(i * s), the pixel's top-left corner truncated (up-left of the centre by half a pixel).
    """
    scale = np.asarray(scale_xy, np.float64)
    out = []
    for contour in contours:
        pts = contour.reshape(-1, 2).astype(np.float64)
        out.append(np.floor(pts * scale) if geometry == "clam" else np.round((pts + 0.5) * scale, 2))
    return out


def contours_to_geojson(result: SegmentationResult) -> dict:
    """Tissue polygons (with holes) in level-0 pixel coordinates, as a QuPath-readable FeatureCollection.

    The contour-based tiling rules (clam, trident) read their tissue from these polygons.
    """
    scale = result.tissue.scale_xy

    def ring(contour: np.ndarray) -> list[list[float]]:
        (pts,) = contours_to_level0([contour], scale, result.geometry)
        coords = [[int(x), int(y)] if result.geometry == "clam" else [float(x), float(y)] for x, y in pts]
        coords.append(coords[0])
        return coords

    features = []
    for outer, hole_list in zip(result.outers, result.holes):
        if len(outer) < 3:
            continue
        rings = [ring(outer)] + [ring(h) for h in hole_list if len(h) >= 3]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def load_tissue_polygons(path: str | Path) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """(outer ring, hole rings) per polygon of a tissue GeoJSON, level-0 (k, 2) float64, closing point dropped."""
    try:
        collection = json.loads(Path(path).read_text())
        polygons = []
        for feature in collection["features"]:
            geometry = feature["geometry"]
            parts = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
            for rings in parts:
                arrays = [np.asarray(r, np.float64).reshape(-1, 2) for r in rings]
                arrays = [a[:-1] if len(a) > 1 and (a[0] == a[-1]).all() else a for a in arrays]
                polygons.append((arrays[0], arrays[1:]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SlideError(f"{path}: not a tissue GeoJSON (FeatureCollection of Polygons): {exc}") from exc
    return polygons


def overview_image(ws: WholeSlide, result: SegmentationResult, min_side: int = 768) -> np.ndarray:
    """An RGB overview for humans: the segmentation thumbnail, or a finer read when that is tiny."""
    w0, h0 = ws.dimensions
    mask_h, mask_w = result.tissue.mask.shape
    if max(mask_w, mask_h) >= min_side:
        return result.thumbnail
    finer_mpp = max(ws.mpp_x, max(w0 * ws.mpp_x, h0 * ws.mpp_y) / min_side)
    return ws.thumbnail_at_mpp(finer_mpp)


def draw_overlay(result: SegmentationResult, image: np.ndarray | None = None, max_side: int = 1024) -> np.ndarray:
    """Overview (default: the thumbnail) with tissue contours (green) and holes (blue) for humans."""
    img = (result.thumbnail if image is None else image).copy()
    mask_h, mask_w = result.tissue.mask.shape
    sx, sy = img.shape[1] / mask_w, img.shape[0] / mask_h

    def scaled(contours: list[np.ndarray]) -> list[np.ndarray]:
        return [np.round((c.astype(np.float64) + 0.5) * (sx, sy) - 0.5).astype(np.int32) for c in contours]

    thick = max(1, round(max(img.shape[:2]) / 400))
    cv2.drawContours(img, scaled(result.outers), -1, TISSUE_RGB, thick)
    for hole_list in result.holes:
        cv2.drawContours(img, scaled(hole_list), -1, HOLE_RGB, thick)
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return img


def segmentation_paths(out_dir: Path, slide_id: str) -> dict[str, Path]:
    return {
        "mask": out_dir / f"{slide_id}_mask.png",
        "thumbnail": out_dir / f"{slide_id}_thumbnail.png",
        "geojson": out_dir / f"{slide_id}.geojson",
        "json": out_dir / f"{slide_id}_segmentation.json",
    }


def write_segmentation(
    result: SegmentationResult, ws: WholeSlide, params: SegmentationParams, out_dir: Path, preset: str | None = None
) -> dict:
    """Write the four per-slide outputs; returns the summary that goes into the JSON (with the preset, which
    `tile --seg-dir` follows)."""
    paths = segmentation_paths(out_dir, ws.slide_id)
    result.tissue.save_png(paths["mask"])
    tissue_px = int(result.tissue.mask.sum())
    area_mm2 = tissue_px * result.tissue.mpp_xy[0] * result.tissue.mpp_xy[1] / 1e6
    overlay = draw_overlay(result, overview_image(ws, result))
    legend = [("tissue", TISSUE_RGB, "line"), ("holes", HOLE_RGB, "line")]
    caption = f"{ws.slide_id} · {ws.mpp_x:.3g} µm/px · tissue {area_mm2:.2f} mm²"
    um_per_px = ws.dimensions[0] * ws.mpp_x / overlay.shape[1]
    save_annotated_png(annotate(overlay, um_per_px, legend, caption), overlay.shape[0], paths["thumbnail"])
    write_json(paths["geojson"], contours_to_geojson(result))
    summary = {
        "slide_id": ws.slide_id,
        "status": "ok" if tissue_px else "no_tissue",
        "tissue_area_mm2": area_mm2,
        "n_tissue_regions": len(result.outers),
        "n_holes": sum(len(h) for h in result.holes),
        "saturation_threshold": result.threshold,
        "mask_size": [int(result.tissue.mask.shape[1]), int(result.tissue.mask.shape[0])],
        "mask_mpp": list(result.tissue.mpp_xy),
        "params": dataclasses.asdict(params),
        "preset": preset,
        "slide": ws.describe(),
        "software": f"preprocessing {__version__}",
    }
    write_json(paths["json"], summary)
    return summary


def segment_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    preset: str | None = None,
    mpp: float | None = None,
    **params: object,
) -> Path:
    """Segment one slide and write its outputs into `out_dir`; returns the mask path."""
    seg_params = make_params(preset, **params)
    out_dir = Path(out_dir)
    with WholeSlide(slide_path, mpp_override=mpp) as ws:
        result = segment_slide_object(ws, seg_params)
        write_segmentation(result, ws, seg_params, out_dir, preset)
        return segmentation_paths(out_dir, ws.slide_id)["mask"]


def add_segmentation_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the config section `segmentation` (shared by `segment` and `tile`)."""
    add_arguments(parser.add_argument_group("segmentation (config section `segmentation`)"), SegmentationParams,
                  presets=PRESETS)


def params_from_args(args: argparse.Namespace) -> SegmentationParams:
    """The preset named by --preset, overridden by the segmentation flags given."""
    return make_params(getattr(args, "preset", None), **given(SegmentationParams, args))


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    """--slide, --slide-id and --mpp: one slide, the id its outputs are named after, its pixel size."""
    parser.add_argument("--slide", required=True, help="slide file")
    parser.add_argument("--slide-id", help="id in every output name (a sample sheet's slide_id); "
                                           "default: the file name without its extension")
    parser.add_argument("--mpp", type=float, help="level-0 µm/px override (config key mpp_overrides)")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m preprocessing segment", __doc__,
                            "python -m preprocessing segment --slide S.svs --out seg/ --preset clam")
    add_slide_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    add_segmentation_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr()
    params = params_from_args(args)
    with WholeSlide(args.slide, mpp_override=args.mpp, slide_id=args.slide_id) as ws:
        result = segment_slide_object(ws, params)
        summary = write_segmentation(result, ws, params, Path(args.out), getattr(args, "preset", None))
    print(json.dumps({k: summary[k] for k in ("slide_id", "status", "tissue_area_mm2", "n_tissue_regions")}))
    return 0
