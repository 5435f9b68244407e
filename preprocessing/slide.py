"""Slide access on top of OpenSlide, in physical units.

Every format OpenSlide reads opens here. The pixel size comes from the slide (never a silent default),
regions are composited onto the slide's background colour, and reads at a target µm/px pick the closest
pyramid level that is at least as fine and resample once.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import openslide
from wsicore.errors import InputError
from wsicore.progress import Progress

# TIFF ResolutionUnit -> micrometres per unit.
_UM_PER_UNIT = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0, "millimeter": 1000.0, "micrometer": 1.0}

# A level counts as "at least as fine" as the target when its µm/px exceeds the target by no more than this
# relative tolerance; it absorbs the rounding in pyramid sizes (e.g. 2.0005 instead of 2).
LEVEL_TOLERANCE = 1e-3


class SlideError(InputError, RuntimeError):
    """A slide that cannot be used: unreadable, corrupt, or lacking information. Names the slide."""


class MissingMppError(SlideError):
    """The slide does not record its pixel size and no override was given."""


class UnusualSlideError(SlideError):
    """The slide claims a pixel size or a size outside what a real scan (or its file) can have."""


# Plausible level-0 pixel sizes: from beyond 100x scans to a 0.5x overview.
MPP_RANGE = (0.05, 20.0)
# No scanner writes a level-0 side beyond this (a 75 mm slide at 0.17 µm/px is 440,000 px).
MAX_LEVEL0_SIDE = 500_000
# Level-0 pixels one byte of a single-file slide can hold. Blank JPEG tiles need ~0.01 byte/px
# (~100 px/byte); a file claiming far more pixels than this per byte cannot contain them.
MAX_PIXELS_PER_BYTE = 2_000
# Formats whose pixels live in companion files, so the opened file's size says nothing.
_MULTI_FILE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".dcm")


def slide_id_from_path(path: str | Path) -> str:
    """The slide id used in every output name: the file name without its extension."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def mpp_from_properties(props: dict[str, str]) -> tuple[float, float] | None:
    """Level-0 µm/px from slide properties: openslide.mpp-x/y, then aperio.MPP, then TIFF resolution tags."""

    def _pos(value: str | None) -> float | None:
        try:
            v = float(value) if value is not None else None
        except ValueError:
            return None
        return v if v is not None and math.isfinite(v) and v > 0 else None

    mx, my = _pos(props.get("openslide.mpp-x")), _pos(props.get("openslide.mpp-y"))
    if mx and my:
        return mx, my
    if mx or my:
        return (mx or my, mx or my)  # one axis recorded: pixels are square in every scanner format we know
    aperio = _pos(props.get("aperio.MPP"))
    if aperio:
        return aperio, aperio
    unit = (props.get("tiff.ResolutionUnit") or "").lower()
    xres, yres = _pos(props.get("tiff.XResolution")), _pos(props.get("tiff.YResolution"))
    if unit in _UM_PER_UNIT and xres:
        um = _UM_PER_UNIT[unit]
        return um / xres, um / (yres or xres)
    return None


def _parse_background(props: dict[str, str], default: tuple[int, int, int]) -> tuple[int, int, int]:
    hexcolour = props.get("openslide.background-color")
    if hexcolour and len(hexcolour) == 6:
        try:
            return tuple(int(hexcolour[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
        except ValueError:
            pass
    return default


class WholeSlide:
    """An open whole-slide image with its pixel size resolved.

    `mpp_override` (from the config key `mpp_overrides`) wins over the file's metadata; without either,
    opening succeeds but asking for the pixel size raises `MissingMppError`.
    """

    def __init__(
        self,
        path: str | Path,
        mpp_override: float | None = None,
        background: tuple[int, int, int] | None = None,
        slide_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.slide_id = slide_id or slide_id_from_path(self.path)  # a sample sheet may name it otherwise
        if not self.path.exists():
            raise SlideError(f"slide {self.slide_id}: file not found: {self.path}")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as exc:
            raise SlideError(f"slide {self.slide_id}: OpenSlide cannot open {self.path}: {exc}") from exc
        self.properties: dict[str, str] = dict(self._osr.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.background = _parse_background(self.properties, background or (255, 255, 255))
        self.level_dimensions: list[tuple[int, int]] = list(self._osr.level_dimensions)
        self.level_count = len(self.level_dimensions)
        if mpp_override is not None and not (mpp_override > 0 and math.isfinite(mpp_override)):
            raise SlideError(f"slide {self.slide_id}: mpp override must be a positive number, got {mpp_override}")
        self.mpp_source = "override" if mpp_override is not None else "metadata"
        self._mpp = (float(mpp_override), float(mpp_override)) if mpp_override else mpp_from_properties(self.properties)

    def check_plausible(self) -> None:
        """Refuse, before any pixel is read, a pixel size or level-0 size no real scan has.

        Raises `UnusualSlideError` naming the slide, the claim and the override (`--allow-unusual-slide`).
        A slide without a pixel size passes here; asking for it later raises `MissingMppError`.
        """
        override = "or pass --allow-unusual-slide to process it anyway"
        hint = "segmentation.allow_unusual_slide: true processes it anyway"
        if self._mpp is not None:
            lo, hi = MPP_RANGE
            if not all(lo <= m <= hi for m in self._mpp):
                raise UnusualSlideError(
                    f"slide {self.slide_id}: level-0 pixel size {self._mpp[0]:.4g} µm/px ({self.mpp_source}) is outside "
                    f"the plausible {lo:g}-{hi:g} µm/px; pass the right value with --mpp, {override}",
                    config_hint=f"set the right value under `mpp_overrides:`; {hint}")
        w0, h0 = self.dimensions
        if max(w0, h0) > MAX_LEVEL0_SIDE:
            raise UnusualSlideError(
                f"slide {self.slide_id}: claims {w0} x {h0} px at level 0, beyond the {MAX_LEVEL0_SIDE:,} px any scanner "
                f"writes; the file is damaged or not a slide, {override}", config_hint=hint)
        if self.path.is_file() and not self.path.name.lower().endswith(_MULTI_FILE_SUFFIXES):
            n_bytes = self.path.stat().st_size
            if w0 * h0 > MAX_PIXELS_PER_BYTE * n_bytes:
                raise UnusualSlideError(
                    f"slide {self.slide_id}: claims {w0} x {h0} px at level 0 in a file of {n_bytes:,} bytes "
                    f"({w0 * h0 / max(n_bytes, 1):,.0f} px per byte; real scans hold under {MAX_PIXELS_PER_BYTE:,}); "
                    f"the file is damaged or not a slide, {override}", config_hint=hint)

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "WholeSlide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def has_mpp(self) -> bool:
        return self._mpp is not None

    @property
    def mpp_xy(self) -> tuple[float, float]:
        if self._mpp is None:
            raise MissingMppError(
                f"slide {self.slide_id}: no pixel size (µm/px) in its metadata (no openslide.mpp-x/y, aperio.MPP "
                f"or TIFF resolution); pass its level-0 µm/px with --mpp (it is never guessed)",
                config_hint=f"add `{self.slide_id}: <µm/px>` under `mpp_overrides:`, or an mpp column to the "
                            f"sample sheet")
        return self._mpp

    @property
    def mpp_x(self) -> float:
        return self.mpp_xy[0]

    @property
    def mpp_y(self) -> float:
        return self.mpp_xy[1]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def objective_power(self) -> float | None:
        value = self.properties.get("openslide.objective-power") or self.properties.get("aperio.AppMag")
        try:
            return float(value) if value else None
        except ValueError:
            return None

    def level_downsample_xy(self, level: int) -> tuple[float, float]:
        """Exact per-axis downsample of a level: level-0 size over level size (not OpenSlide's rounded mean)."""
        w0, h0 = self.level_dimensions[0]
        w, h = self.level_dimensions[level]
        return w0 / w, h0 / h

    def level_mpp_xy(self, level: int) -> tuple[float, float]:
        dx, dy = self.level_downsample_xy(level)
        return self.mpp_x * dx, self.mpp_y * dy

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose µm/px is at most `target_mpp` (at least as fine); level 0 if none is."""
        fine_enough = [
            level
            for level in range(self.level_count)
            if max(self.level_mpp_xy(level)) <= target_mpp * (1 + LEVEL_TOLERANCE)
        ]
        return max(fine_enough, key=lambda level: self.level_mpp_xy(level)[0], default=0)

    # -- pixels ---------------------------------------------------------------------------------------
    def read_region(self, xy_level0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` pixels at `level`, top-left at level-0 `xy_level0`.

        Transparent pixels (outside the scanned area) are composited onto the background colour.
        """
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"empty region size {size}")
        try:
            rgba = np.asarray(self._osr.read_region((int(xy_level0[0]), int(xy_level0[1])), level, (w, h)))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"slide {self.slide_id}: cannot read region {w}x{h} at level {level} from level-0 "
                f"{tuple(xy_level0)} ({self.path}): {exc}"
            ) from exc
        return composite_on_background(rgba, self.background)

    def read_level(self, level: int) -> np.ndarray:
        """The whole of `level` in one read, pixel for pixel (no resampling); callers bound its size."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def best_level_for_downsample(self, downsample: float) -> int:
        """OpenSlide's choice: the coarsest level whose (rounded mean) downsample is below `downsample`."""
        return self._osr.get_best_level_for_downsample(downsample)

    def read_region_at_mpp(
        self, xy_level0: tuple[int, int], size: tuple[int, int], target_mpp: float, level: int | None = None
    ) -> np.ndarray:
        """`size` pixels at `target_mpp` µm/px starting at level-0 `xy_level0`: one read, one resample."""
        level = self.best_level_for_mpp(target_mpp) if level is None else level
        dx, dy = self.level_downsample_xy(level)
        read_w = max(1, round(size[0] * target_mpp / (self.mpp_x * dx)))
        read_h = max(1, round(size[1] * target_mpp / (self.mpp_y * dy)))
        region = self.read_region(xy_level0, level, (read_w, read_h))
        return resize(region, size)

    def thumbnail_at_mpp(self, target_mpp: float, piece: int = 4096) -> np.ndarray:
        """The whole slide at about `target_mpp`, read in pieces of at most `piece`² pixels at the read level.

        Memory stays bounded by the output plus one piece, whatever the slide size. The output grid is
        ceil(level-0 size * mpp / target_mpp), so one output pixel is exactly `target_mpp` µm except for
        the clipped last row and column.
        """
        w0, h0 = self.dimensions
        out_w = max(1, math.ceil(w0 * self.mpp_x / target_mpp))
        out_h = max(1, math.ceil(h0 * self.mpp_y / target_mpp))
        return self.resampled_level0_grid(out_w, out_h, target_mpp, piece)

    def resampled_level0_grid(self, out_w: int, out_h: int, target_mpp: float, piece: int = 4096) -> np.ndarray:
        """Whole slide resampled onto an `out_w` x `out_h` grid, read piecewise (see `thumbnail_at_mpp`)."""
        w0, h0 = self.dimensions
        level = self.best_level_for_mpp(target_mpp)
        dx, dy = self.level_downsample_xy(level)
        lw, lh = self.level_dimensions[level]
        fx, fy = lw / out_w, lh / out_h  # read-level pixels per output pixel
        out = np.empty((out_h, out_w, 3), np.uint8)
        step_x = max(1, int(piece / fx))
        step_y = max(1, int(piece / fy))
        n_pieces = math.ceil(out_h / step_y) * math.ceil(out_w / step_x)
        # a huge slide takes minutes here: say how far the read is (one piece is up to piece² read-level px)
        with Progress(n_pieces, f"slide {self.slide_id}: reading level {level} for {target_mpp:g} µm/px", "piece",
                      every_s=10, enabled=n_pieces > 4) as progress:
            for ty0 in range(0, out_h, step_y):
                ty1 = min(out_h, ty0 + step_y)
                ly0, ly1 = round(ty0 * fy), min(lh, max(round(ty0 * fy) + 1, round(ty1 * fy)))
                for tx0 in range(0, out_w, step_x):
                    tx1 = min(out_w, tx0 + step_x)
                    lx0, lx1 = round(tx0 * fx), min(lw, max(round(tx0 * fx) + 1, round(tx1 * fx)))
                    region = self.read_region((round(lx0 * dx), round(ly0 * dy)), level, (lx1 - lx0, ly1 - ly0))
                    out[ty0:ty1, tx0:tx1] = resize(region, (tx1 - tx0, ty1 - ty0))
                    progress.update()
        return out

    def describe(self) -> dict:
        """Facts about the slide for logs and output attributes."""
        info = {
            "slide_id": self.slide_id,
            "path": str(self.path),
            "vendor": self.vendor,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples_xy": [list(self.level_downsample_xy(i)) for i in range(self.level_count)],
            "objective_power": self.objective_power,
        }
        if self.has_mpp:
            info.update(mpp_x=self.mpp_x, mpp_y=self.mpp_y, mpp_source=self.mpp_source)
        return info


def composite_on_background(rgba: np.ndarray, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """RGB uint8 from OpenSlide's (non-premultiplied) RGBA, alpha-blended onto `background`."""
    if rgba.shape[-1] == 3:
        return np.ascontiguousarray(rgba)
    alpha = rgba[..., 3]
    rgb = rgba[..., :3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32)[..., None] / 255.0
    bg = np.asarray(background, np.float32)
    return np.clip(rgb.astype(np.float32) * a + bg * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased resample to (w, h): area averaging when shrinking, bicubic when enlarging."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    shrinking = size[0] < w or size[1] < h
    return cv2.resize(image, tuple(int(s) for s in size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
