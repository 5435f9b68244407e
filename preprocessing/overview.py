"""Slide overviews for people: a legend strip under the image (what each colour is, a scale bar, the slide's
µm/px and patch count) and a JPEG written within a byte budget, so a report of 1,000 slides stays small.

The strip's height is recorded in a PNG's text chunk (`overview_height`: the image rows above it), so tiling
can draw its patches on the segmentation's overview without the legend.
"""

from __future__ import annotations

import io
import math
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from wsicore.files import atomic_path

TISSUE_RGB = (0, 160, 0)
HOLE_RGB = (0, 0, 220)
PATCH_RGB = (230, 120, 0)
# Report images: at most REPORT_MAX_SIDE px and REPORT_MAX_BYTES each (at most 53 KB in the HTML report once
# base64-encoded, so 1,000 slides add at most 53 MB).
REPORT_MAX_SIDE = 1024
REPORT_MAX_BYTES = 40_000
PATCH_TINT = 0.3  # share of PATCH_RGB in the colour of kept patches: the tissue's own colour stays readable


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    # DejaVu Sans (shipped with matplotlib) has µ and ², which Pillow's built-in font lacks
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf"), size)


def scale_bar_um(um_per_px: float, width_px: int, share: float = 0.25) -> float:
    """The longest 1, 2 or 5 x 10^k µm that spans at most `share` of the image width."""
    limit = um_per_px * width_px * share
    exponent = math.floor(math.log10(limit))
    return max(m * 10.0 ** exponent for m in (1, 2, 5) if m * 10.0 ** exponent <= limit)


def format_length(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def legend_strip(width: int, um_per_px: float, items: list[tuple[str, tuple[int, int, int], str]],
                 caption: str) -> np.ndarray:
    """A white strip `width` px wide: swatches with labels (`kind` "line" or "box"), then a scale bar and
    the caption."""
    size = max(12, round(width / 60))
    font = _font(size)
    row = round(size * 1.7)
    pad = size // 2
    strip = Image.new("RGB", (width, 2 * row + pad), "white")
    draw = ImageDraw.Draw(strip)
    x, y = pad, pad
    for label, rgb, kind in items:
        if kind == "line":
            draw.line([(x, y + row // 2 - 2), (x + 2 * size, y + row // 2 - 2)], fill=rgb, width=max(2, size // 6))
        else:
            tint = tuple(round(255 * (1 - PATCH_TINT) + c * PATCH_TINT) for c in rgb)
            draw.rectangle([x, y + 2, x + 2 * size, y + row - 6], fill=tint, outline=rgb, width=max(1, size // 8))
        draw.text((x + 2 * size + pad, y), label, fill="black", font=font)
        x += 2 * size + 2 * pad + round(draw.textlength(label, font=font)) + 2 * size
    length_um = scale_bar_um(um_per_px, width)
    bar = round(length_um / um_per_px)
    y = row + pad
    draw.rectangle([pad, y + row // 2 - 3, pad + bar, y + row // 2], fill="black")
    for end in (pad, pad + bar):
        draw.line([(end, y + 4), (end, y + row - 4)], fill="black", width=2)
    draw.text((pad + bar + pad, y), f"{format_length(length_um)}   {caption}", fill="black", font=font)
    return np.asarray(strip)


def annotate(image: np.ndarray, um_per_px: float, items: list[tuple[str, tuple[int, int, int], str]],
             caption: str) -> np.ndarray:
    """`image` with its legend strip below (see `legend_strip`)."""
    return np.concatenate([image, legend_strip(image.shape[1], um_per_px, items, caption)], axis=0)


def save_annotated_png(image: np.ndarray, overview_height: int, path: Path) -> None:
    """An annotated overview as PNG; the rows of the overview above its legend are recorded for `load_overview`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("overview_height", str(overview_height))
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def load_overview(path: Path) -> np.ndarray:
    """The overview of an annotated PNG, without its legend strip."""
    with Image.open(path) as im:
        height = int(im.text.get("overview_height", im.height))  # type: ignore[attr-defined]
        return np.asarray(im.convert("RGB"))[:height]


def save_report_jpeg(overview: np.ndarray, um_per_px: float, items: list[tuple[str, tuple[int, int, int], str]],
                     caption: str, path: Path, max_side: int = REPORT_MAX_SIDE,
                     max_bytes: int = REPORT_MAX_BYTES) -> int:
    """The annotated overview as a JPEG of at most `max_side` px and `max_bytes`: lower quality first, then a
    smaller overview (the legend is drawn at the final size, so its text stays readable); returns the bytes."""
    scale = min(1.0, max_side / max(overview.shape[:2]))
    while True:
        size = (max(1, round(overview.shape[1] * scale)), max(1, round(overview.shape[0] * scale)))
        small = np.asarray(Image.fromarray(overview).resize(size, Image.Resampling.LANCZOS)) if scale < 1 else overview
        im = Image.fromarray(annotate(small, um_per_px / scale, items, caption))
        for quality in (80, 65, 50, 40):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality, optimize=True)
            if buf.tell() <= max_bytes:
                break
        if buf.tell() <= max_bytes or max(size) <= 256:
            break
        scale *= 0.85
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return buf.tell()
