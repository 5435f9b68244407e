"""JPEG tiles decoded and cut into patches on the model's device: nvJPEG on CUDA, libjpeg-turbo on CPU.

The readers only read compressed tile bytes (`readers.TileCrops`); here a region's tiles are decoded in one
`torchvision.io.decode_jpeg` call, laid out as the region's tile grid (a reused buffer), the patches are
cut from it and shrunk by `area_resize` (OpenCV's INTER_AREA). On CPU this gives exactly the reader path's
pixels (same libjpeg-turbo decode; exact 2x, 3x, ... area averaging); nvJPEG's IDCT and chroma upsampling
are not libjpeg-turbo's, so on CUDA pixels can differ by a few grey levels.
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from preprocessing.encoders.transforms import area_resize
from preprocessing.readers import TileCrops


_canvas: dict[torch.device, torch.Tensor] = {}  # reused: a fresh region-sized buffer costs page faults on CPU


def decode_crops(crops: TileCrops, patch_size: int, device: torch.device) -> torch.Tensor:
    """The patches of one region as uint8 `[k, patch_size, patch_size, 3]` on `device`."""
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in crops.streams]
    tiles = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    rows, cols = crops.grid
    th, tw = crops.tile_hw
    device = tiles[0].device
    canvas = _canvas.get(device)
    if canvas is None or canvas.numel() < 3 * rows * th * cols * tw:
        canvas = _canvas[device] = torch.empty(3 * rows * th * cols * tw, dtype=torch.uint8, device=device)
    grid = canvas[: 3 * rows * th * cols * tw].view(3, rows * th, cols * tw)
    for i, tile in enumerate(tiles):  # the region's tile grid, row-major
        r, c = divmod(i, cols)
        grid[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw] = tile
    rs = crops.read_size
    patches = torch.stack([grid[:, y : y + rs, x : x + rs] for x, y in crops.offsets.tolist()])  # (k, 3, rs, rs)
    return area_resize(patches, patch_size).permute(0, 2, 3, 1)
