"""A pyramid level's compressed tiles, read straight from the TIFF: the pass-through source of patch pixels.

OpenSlide decodes a tile and then paints it with cairo into a premultiplied ARGB buffer; for JPEG tiles the
painting costs about four times the decode itself (measured: 1.1-1.3 ms vs 0.21-0.26 ms per 256² tile).
For TIFF-based slides whose levels are plain tiled TIFF pages (Aperio SVS, generic tiled TIFF) a level *is*
its tiles, so we read the compressed bytes (tifffile gives offsets, byte counts and the JPEG tables) and
decode them ourselves:

- in a reader process (`TiledLevel.decode`): JPEG with libjpeg-turbo through simplejpeg, which like OpenSlide
  refuses corrupt data (libjpeg warnings are errors; imagecodecs and OpenCV decode a damaged tile silently),
  JPEG 2000 with OpenJPEG through imagecodecs;
- or, for JPEG, on the model's device with `torchvision.io.decode_jpeg` (nvJPEG on CUDA; libjpeg-turbo on CPU).

Both take the self-contained stream of `TiledLevel.jpeg_stream` (JPEG tables spliced in, colour space
marked) and give OpenSlide's pixels exactly on CPU (same decoders; tested on the real slides). `TiledLevel.open`
returns None whenever the tile path would not reproduce OpenSlide exactly (other vendors and codecs, Aperio's
YCbCr JPEG 2000 whose colour conversion OpenSlide does itself, missing tiles, odd sample layouts, colour
markers that contradict the TIFF), and the reader then uses OpenSlide. This module does not import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import imagecodecs
import numpy as np
import simplejpeg
import tifffile

JPEG = 7
APERIO_JP2K_RGB = 33005  # Aperio JPEG 2000, RGB components (33003, YCbCr, is converted by OpenSlide itself)
CODECS = {JPEG: "jpeg", APERIO_JP2K_RGB: "jpeg2k"}
# OpenSlide vendors whose levels are tiled TIFF pages decoded as they are.
VENDORS = ("aperio", "generic-tiff")

# An Adobe APP14 marker without its last byte, the colour transform (0: RGB components, 1: YCbCr). libjpeg picks
# the JPEG colour space from JFIF/Adobe markers or component ids, while OpenSlide takes it from the TIFF
# photometric tag; the marker makes a stand-alone decoder (nvJPEG, torchvision) agree with OpenSlide.
_ADOBE = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00"


@dataclass
class TiledLevel:
    """One pyramid level stored as tiled TIFF tiles that decode to exactly what OpenSlide returns."""

    path: str
    level: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray  # (n_tiles,) int64 file offsets, row-major
    counts: np.ndarray  # (n_tiles,) int64 byte counts
    codec: str  # "jpeg" | "jpeg2k"
    jpeg_tables: bytes | None
    rgb_components: bool  # JPEG stored as R, G, B (TIFF photometric RGB), not YCbCr

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    @classmethod
    def open(cls, path: str, level: int, level_dimensions: tuple[int, int], vendor: str) -> "TiledLevel | None":
        """The level's tiles, or None when reading them would not give OpenSlide's pixels exactly."""
        if vendor not in VENDORS:
            return None
        try:
            with tifffile.TiffFile(path) as tf:
                pages = [p for p in tf.pages if p.is_tiled and (p.imagewidth, p.imagelength) == tuple(level_dimensions)]
                if len(pages) != 1:
                    return None
                page = pages[0]
                if (page.compression not in CODECS or page.samplesperpixel != 3 or page.bitspersample != 8
                        or page.planarconfig != 1 or page.imagedepth != 1 or page.extrasamples):
                    return None
                if page.photometric not in (2, 6):  # RGB, YCbCr
                    return None
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                tables = page.jpegtables
                first = _read(path, int(offsets[0]), int(counts[0])) if len(counts) and counts[0] > 0 else b""
        except (OSError, tifffile.TiffFileError, ValueError, IndexError):
            return None
        if len(offsets) == 0 or (counts <= 0).any():  # a missing tile is painted as background by OpenSlide
            return None
        codec = CODECS[page.compression]
        rgb = page.photometric == 2
        tables_bytes = bytes(tables) if tables is not None else None
        if codec == "jpeg" and not _colour_markers_agree(tables_bytes, first, rgb):
            return None
        return cls(path, level, page.imagewidth, page.imagelength, page.tilewidth, page.tilelength, offsets, counts,
                   codec, tables_bytes, rgb)

    def tile_range(self, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
        """Tile columns [c0, c1) and rows [r0, r1) covering the level-pixel rectangle (x, y, w, h)."""
        return x // self.tile_w, y // self.tile_h, -(-(x + w) // self.tile_w), -(-(y + h) // self.tile_h)

    def contains(self, x: int, y: int, w: int, h: int) -> bool:
        return x >= 0 and y >= 0 and x + w <= self.width and y + h <= self.height

    def read(self, fd: int, col: int, row: int) -> bytes:
        """The compressed bytes of tile (col, row)."""
        i = row * self.tiles_across + col
        return os.pread(fd, int(self.counts[i]), int(self.offsets[i]))

    def decode(self, data: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """One tile as RGB uint8 (tile_h, tile_w, 3), decoded as OpenSlide decodes it; corrupt data raises."""
        if self.codec == "jpeg":
            # ISLOW DCT and fancy upsampling: libjpeg's defaults, which OpenSlide uses
            return simplejpeg.decode_jpeg(self.jpeg_stream(data), colorspace="RGB", fastdct=False, fastupsample=False,
                                          buffer=out, strict=True)
        return imagecodecs.jpeg2k_decode(data, out=out)

    def jpeg_stream(self, data: bytes) -> bytes:
        """A self-contained JPEG stream for a stand-alone decoder: tables spliced in, colour space marked."""
        assert self.codec == "jpeg"
        body = data[2:]  # without SOI
        if self.jpeg_tables:
            body = self.jpeg_tables[2:-2] + body  # tables without their SOI and EOI
        marker = b"" if _has_app14(data) or _has_app14(self.jpeg_tables) else _ADOBE + (b"\x00" if self.rgb_components else b"\x01")
        return b"\xff\xd8" + marker + body


def _read(path: str, offset: int, count: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(count)


def _markers(stream: bytes | None) -> dict[int, bytes]:
    """APPn/SOF payloads of a JPEG header (up to the first SOS), keyed by marker byte."""
    found: dict[int, bytes] = {}
    if not stream or stream[:2] != b"\xff\xd8":
        return found
    i = 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image (tables-only stream)
            break
        length = int.from_bytes(stream[i + 2 : i + 4], "big")
        found.setdefault(marker, stream[i + 4 : i + 2 + length])
        i += 2 + length
    return found


def _has_app14(stream: bytes | None) -> bool:
    return 0xEE in _markers(stream)


def _colour_markers_agree(tables: bytes | None, first_tile: bytes, rgb: bool) -> bool:
    """Whether a stand-alone decoder given `jpeg_stream` will use the colour space OpenSlide uses.

    libjpeg's rule: a JFIF marker means YCbCr; else an Adobe marker's transform decides; else component ids.
    We add an Adobe marker when there is none, so only streams whose existing markers contradict the TIFF
    photometric tag are refused (a JFIF marker on RGB data, or an Adobe transform of the other kind).
    """
    markers = {**_markers(tables), **_markers(first_tile)}
    if 0xE0 in markers and markers[0xE0].startswith(b"JFIF"):
        return not rgb
    adobe = markers.get(0xEE)
    if adobe is not None:
        return len(adobe) >= 12 and adobe.startswith(b"Adobe") and adobe[11] == (0 if rgb else 1)
    return True
