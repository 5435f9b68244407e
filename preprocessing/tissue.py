"""Tissue segmentation on a coarse thumbnail, with thresholds in physical units.

Saturation (HSV) -> median blur -> Otsu or fixed threshold -> morphological closing -> contours with
tissue and hole area filters (µm²), keeping the largest holes up to a limit. The whole slide is never
loaded: the thumbnail (about 8 µm/px) is read in bounded pieces.

Outputs per slide: `<id>_mask.png` (its µm/px in PNG text chunks and in the JSON), `<id>_thumbnail.png`
(contours drawn, for humans), `<id>.geojson` (polygons in level-0 pixels; QuPath opens it) and
`<id>_segmentation.json` (parameters, status, areas).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from preprocessing import __version__
from wsicore.cli import command_parser
from wsicore.files import atomic_path, write_json
from wsicore.settings import add_arguments, given, setting
from preprocessing.slide import SlideError, WholeSlide

# CLAM expresses areas in multiples of a 512x512 level-0 patch ("ref_patch_size").
CLAM_REF_PATCH = 512


@dataclass
class SegmentationParams:
    """Tissue segmentation (config section `segmentation`); kernel sizes are in thumbnail pixels."""

    seg_mpp: float = setting(8.0, help="µm/px of the working thumbnail", exclusive_minimum=0)
    seg_downsample: float | None = setting(
        None, help="thumbnail at this level-0 downsample instead of seg_mpp (CLAM's seg_level)", minimum=1)
    sthresh: int | None = setting(None, help="fixed saturation threshold 0-255; null = Otsu", minimum=0, maximum=255)
    min_saturation: int = setting(
        15, help="floor under the Otsu threshold, so blank glass yields no tissue", minimum=0, maximum=255)
    median_kernel: int = setting(7, help="median blur kernel (odd)", minimum=1)
    close_kernel: int = setting(4, help="morphological closing kernel; 0 = no closing", minimum=0)
    min_tissue_area_um2: float = setting(20_000.0, help="smallest tissue region kept (net of holes)", minimum=0)
    min_hole_area_um2: float = setting(10_000.0, help="smallest hole kept", minimum=0)
    max_n_holes: int = setting(8, help="largest holes kept per region", minimum=0)
    area_unit: str = setting(
        "um2", choices=["um2", "clam_ref_patch"],
        help="unit of the two areas: µm², or CLAM's 512x512 level-0 reference patches")

    def __post_init__(self) -> None:
        if self.area_unit not in {"um2", "clam_ref_patch"}:
            raise ValueError(f"segmentation.area_unit must be 'um2' or 'clam_ref_patch', got {self.area_unit!r}")
        if self.median_kernel < 1 or self.median_kernel % 2 == 0:
            raise ValueError(f"segmentation.median_kernel must be a positive odd number, got {self.median_kernel}")


PRESETS: dict[str, dict] = {
    "default": {},
    # CLAM's presets/tcga.csv: seg at 64x downsample, sthresh 8, mthresh 7, close 4, no Otsu,
    # a_t 16 and a_h 4 reference patches, max_n_holes 8.
    "clam_tcga": dict(
        seg_downsample=64.0,
        sthresh=8,
        min_saturation=0,
        median_kernel=7,
        close_kernel=4,
        min_tissue_area_um2=16,
        min_hole_area_um2=4,
        max_n_holes=8,
        area_unit="clam_ref_patch",
    ),
}


def make_params(preset: str | None = None, **overrides: object) -> SegmentationParams:
    """Parameters from a preset name plus explicit overrides (None values are ignored)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown segmentation preset {preset!r}; choose from {sorted(PRESETS)}")
    values = dict(PRESETS.get(preset or "default", {}))
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
            raise ValueError(f"{path}: not a tissue mask written by this package (missing PNG text {exc})") from exc


@dataclass
class SegmentationResult:
    tissue: TissueMask
    outers: list[np.ndarray]  # contours in mask pixels, (k, 2) int
    holes: list[list[np.ndarray]]
    threshold: float
    thumbnail: np.ndarray


def saturation_threshold(rgb: np.ndarray, params: SegmentationParams) -> tuple[np.ndarray, float]:
    """Binary foreground from HSV saturation: median blur, then Otsu (floored) or a fixed threshold."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    sat = cv2.medianBlur(sat, params.median_kernel)
    if params.sthresh is None:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thresh = max(float(otsu), float(params.min_saturation))
    else:
        thresh = float(max(params.sthresh, params.min_saturation))
    binary = (sat > thresh).astype(np.uint8)
    if params.close_kernel > 0:
        kernel = np.ones((params.close_kernel, params.close_kernel), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    return binary, thresh


def filter_contours(
    binary: np.ndarray, min_tissue_px: float, min_hole_px: float, max_n_holes: int
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Outer contours whose area net of holes exceeds `min_tissue_px`; per outer, the largest holes
    (at most `max_n_holes`) whose area exceeds `min_hole_px`. Areas are in mask pixels."""
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
    px_area_um2 = mpp_xy[0] * mpp_xy[1]
    if params.area_unit == "clam_ref_patch":
        unit_um2 = CLAM_REF_PATCH**2 * level0_mpp_xy[0] * level0_mpp_xy[1]
    else:
        unit_um2 = 1.0
    min_tissue_px = params.min_tissue_area_um2 * unit_um2 / px_area_um2
    min_hole_px = params.min_hole_area_um2 * unit_um2 / px_area_um2
    outers, holes = filter_contours(binary, min_tissue_px, min_hole_px, params.max_n_holes)
    mask = np.zeros(binary.shape, np.uint8)
    if outers:
        cv2.drawContours(mask, outers, -1, 1, thickness=cv2.FILLED)
        for hole_list in holes:
            if hole_list:
                cv2.drawContours(mask, hole_list, -1, 0, thickness=cv2.FILLED)
    return SegmentationResult(TissueMask(mask, mpp_xy, level0_size, slide_id), outers, holes, thresh, thumbnail)


def segment_slide_object(ws: WholeSlide, params: SegmentationParams) -> SegmentationResult:
    """Segment an open slide (reads only a coarse thumbnail, in bounded pieces)."""
    w0, h0 = ws.dimensions
    if params.seg_downsample:
        target_mpp = params.seg_downsample * ws.mpp_x
    else:
        target_mpp = params.seg_mpp
    thumb = ws.thumbnail_at_mpp(target_mpp)
    mpp_xy = (w0 * ws.mpp_x / thumb.shape[1], h0 * ws.mpp_y / thumb.shape[0])
    return segment_array(thumb, mpp_xy, (w0, h0), params, ws.mpp_xy, ws.slide_id)


def contours_to_geojson(result: SegmentationResult) -> dict:
    """Tissue polygons (with holes) in level-0 pixel coordinates, as a QuPath-readable FeatureCollection."""
    sx, sy = result.tissue.scale_xy

    def ring(contour: np.ndarray) -> list[list[float]]:
        pts = contour.reshape(-1, 2).astype(np.float64)
        coords = [[round(float(x) * sx, 2), round(float(y) * sy, 2)] for x, y in pts]
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
    cv2.drawContours(img, scaled(result.outers), -1, (0, 160, 0), thick)
    for hole_list in result.holes:
        cv2.drawContours(img, scaled(hole_list), -1, (0, 0, 220), thick)
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return img


def save_rgb_png(image: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def segmentation_paths(out_dir: Path, slide_id: str) -> dict[str, Path]:
    return {
        "mask": out_dir / f"{slide_id}_mask.png",
        "thumbnail": out_dir / f"{slide_id}_thumbnail.png",
        "geojson": out_dir / f"{slide_id}.geojson",
        "json": out_dir / f"{slide_id}_segmentation.json",
    }


def write_segmentation(result: SegmentationResult, ws: WholeSlide, params: SegmentationParams, out_dir: Path) -> dict:
    """Write the four per-slide outputs; returns the summary that goes into the JSON."""
    paths = segmentation_paths(out_dir, ws.slide_id)
    result.tissue.save_png(paths["mask"])
    save_rgb_png(draw_overlay(result, overview_image(ws, result)), paths["thumbnail"])
    write_json(paths["geojson"], contours_to_geojson(result))
    tissue_px = int(result.tissue.mask.sum())
    summary = {
        "slide_id": ws.slide_id,
        "status": "ok" if tissue_px else "no_tissue",
        "tissue_area_mm2": tissue_px * result.tissue.mpp_xy[0] * result.tissue.mpp_xy[1] / 1e6,
        "n_tissue_regions": len(result.outers),
        "n_holes": sum(len(h) for h in result.holes),
        "saturation_threshold": result.threshold,
        "mask_size": [int(result.tissue.mask.shape[1]), int(result.tissue.mask.shape[0])],
        "mask_mpp": list(result.tissue.mpp_xy),
        "params": dataclasses.asdict(params),
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
        write_segmentation(result, ws, seg_params, out_dir)
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
                            "python -m preprocessing segment --slide S.svs --out seg/ --preset clam_tcga")
    add_slide_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    add_segmentation_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = params_from_args(args)
        with WholeSlide(args.slide, mpp_override=args.mpp, slide_id=args.slide_id) as ws:
            result = segment_slide_object(ws, params)
            summary = write_segmentation(result, ws, params, Path(args.out))
    except (SlideError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("slide_id", "status", "tissue_area_mm2", "n_tissue_regions")}))
    return 0
