"""Synthetic pyramidal Aperio SVS slides with tissue-like content, for the demo, tests and benchmarks.

The content is procedural and defined in level-0 coordinates, so every pyramid level renders the same
scene and slides of any size are written tile by tile in bounded memory. Classes differ only in tissue
appearance (colour, nuclear density and size, glands, fibres); nothing in the file names it.
"""

from __future__ import annotations

import csv
import functools
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile

from wsicore.cli import command_parser
from wsicore.files import atomic_path, output_folder

BACKGROUND = np.array([243, 243, 241], np.float32)
CLASSES = ("adenocarcinoma", "lymphoid", "stroma")


@dataclass
class Appearance:
    """How one tissue class looks: stroma colour, nuclei on a jittered grid, optional glands and fibres."""

    stroma_rgb: tuple[int, int, int]
    nucleus_rgb: tuple[int, int, int]
    nucleus_cell: float  # level-0 px between nuclei (grid pitch)
    nucleus_radius: float  # level-0 px
    nucleus_fraction: float  # share of grid cells that hold a nucleus
    gland_pitch: float = 0.0  # 0 = no glands
    gland_radius: float = 0.0
    fibre_period: float = 0.0  # 0 = no fibres


APPEARANCES: dict[str, Appearance] = {
    # Crowded, large, dark nuclei lining round gland lumens.
    "adenocarcinoma": Appearance((200, 120, 190), (70, 35, 120), 22, 7.5, 0.9, gland_pitch=180, gland_radius=48),
    # Sheets of small round lymphocytes: very dense, small, almost black-blue nuclei.
    "lymphoid": Appearance((190, 150, 205), (45, 40, 125), 13, 4.5, 0.95),
    # Pink collagen with wavy fibres and sparse thin nuclei.
    "stroma": Appearance((236, 150, 180), (120, 60, 140), 40, 4.0, 0.35, fibre_period=16),
    # Generic H&E for benchmarks and tests.
    "generic": Appearance((220, 140, 185), (80, 45, 135), 24, 6.0, 0.7, fibre_period=30),
}


@dataclass
class Scene:
    """A slide's layout: tissue blobs (ellipses with wavy edges) of one appearance on glass."""

    width: int
    height: int
    appearance: Appearance
    seed: int = 0
    blobs: list[tuple[float, float, float, float, float]] = field(default_factory=list)  # cx, cy, rx, ry, angle

    @classmethod
    def random(cls, width: int, height: int, class_name: str, seed: int, n_blobs: int = 3) -> "Scene":
        rng = np.random.default_rng(seed)
        blobs = []
        for _ in range(n_blobs):
            rx = rng.uniform(0.15, 0.3) * width
            ry = rng.uniform(0.15, 0.3) * height
            cx = rng.uniform(0.3, 0.7) * width
            cy = rng.uniform(0.3, 0.7) * height
            blobs.append((cx, cy, rx, ry, rng.uniform(0, math.pi)))
        return cls(width, height, APPEARANCES[class_name], seed, blobs)

    def tissue(self, x0: float, y0: float, w: int, h: int, ds: float = 1.0) -> np.ndarray:
        """Bool (h, w): whether the level-0 point of pixel (i, j) (as in `render`) lies in a tissue blob."""
        X, Y = self._grid(x0, y0, w, h, ds)
        return self._tissue(X, Y, x0, y0, w, h, ds)

    @staticmethod
    def _grid(x0: float, y0: float, w: int, h: int, ds: float) -> tuple[np.ndarray, np.ndarray]:
        xs = x0 + (np.arange(w, dtype=np.float32) + 0.5) * ds
        ys = y0 + (np.arange(h, dtype=np.float32) + 0.5) * ds
        return np.meshgrid(xs, ys)

    def _tissue(self, X: np.ndarray, Y: np.ndarray, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        tissue = np.zeros((h, w), bool)
        x_end, y_end = x0 + w * ds, y0 + h * ds
        for cx, cy, rx, ry, ang in self.blobs:
            reach = 1.2 * max(rx, ry)  # wavy edge stays within 1.13 radii
            if cx + reach < x0 or cx - reach > x_end or cy + reach < y0 or cy - reach > y_end:
                continue
            c, s = math.cos(ang), math.sin(ang)
            u = ((X - cx) * c + (Y - cy) * s) / rx
            v = (-(X - cx) * s + (Y - cy) * c) / ry
            theta = np.arctan2(v, u)
            edge = 1.0 + 0.08 * np.sin(5 * theta + cx) + 0.05 * np.sin(11 * theta + cy)
            tissue |= (u * u + v * v) < edge * edge
        return tissue

    def render(self, x0: float, y0: float, w: int, h: int, ds: float = 1.0) -> np.ndarray:
        """RGB uint8 (h, w, 3): pixel (i, j) shows level-0 point (x0 + (j + .5) ds, y0 + (i + .5) ds)."""
        X, Y = self._grid(x0, y0, w, h, ds)
        app = self.appearance
        tissue = self._tissue(X, Y, x0, y0, w, h, ds)
        img = np.broadcast_to(BACKGROUND, (h, w, 3)).copy()
        if not tissue.any():
            return _add_noise(img, self.seed, x0, y0, ds)
        stroma = np.asarray(app.stroma_rgb, np.float32)
        tissue_rgb = np.broadcast_to(stroma, (h, w, 3)).copy()
        if app.fibre_period:
            wave = np.sin((X * 0.8 + Y * 0.6 + 6 * np.sin(Y / 50.0)) * (2 * math.pi / app.fibre_period))
            tissue_rgb *= (1.0 - 0.08 * (wave[..., None] > 0.3))
        lumen = np.zeros((h, w), bool)
        gland_ring = np.zeros((h, w), bool)
        if app.gland_pitch:
            gx = np.floor(X / app.gland_pitch)
            gy = np.floor(Y / app.gland_pitch)
            jx = _hash01(gx, gy, self.seed + 11) * 0.4 + 0.3
            jy = _hash01(gx, gy, self.seed + 12) * 0.4 + 0.3
            d = np.hypot(X - (gx + jx) * app.gland_pitch, Y - (gy + jy) * app.gland_pitch)
            lumen = d < app.gland_radius
            gland_ring = (d >= app.gland_radius) & (d < app.gland_radius * 1.45)
        nuclei = _nuclei(X, Y, app, self.seed)
        if app.gland_pitch:
            nuclei |= gland_ring & (_hash01(np.floor(X / 6), np.floor(Y / 6), self.seed + 5) < 0.55)
        nucleus_rgb = np.asarray(app.nucleus_rgb, np.float32)
        tissue_rgb[nuclei] = nucleus_rgb
        tissue_rgb[lumen] = BACKGROUND * 0.98
        img[tissue] = tissue_rgb[tissue]
        return _add_noise(img, self.seed, x0, y0, ds)


def _hash01(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random numbers in [0, 1) from integer-valued grid coordinates."""
    v = np.sin(a * 12.9898 + b * 78.233 + seed * 37.719) * 43758.5453
    return v - np.floor(v)


def _nuclei(X: np.ndarray, Y: np.ndarray, app: Appearance, seed: int) -> np.ndarray:
    cell = app.nucleus_cell
    gx, gy = np.floor(X / cell), np.floor(Y / cell)
    margin = app.nucleus_radius / cell
    jx = margin + _hash01(gx, gy, seed + 1) * max(0.0, 1 - 2 * margin)
    jy = margin + _hash01(gx, gy, seed + 2) * max(0.0, 1 - 2 * margin)
    present = _hash01(gx, gy, seed + 3) < app.nucleus_fraction
    d2 = (X - (gx + jx) * cell) ** 2 + (Y - (gy + jy) * cell) ** 2
    return present & (d2 < app.nucleus_radius**2)


@functools.cache
def _noise_field(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 4.0, (512, 512)).astype(np.float32)


def _add_noise(img: np.ndarray, seed: int, x0: float, y0: float, ds: float) -> np.ndarray:
    """Sensor-like noise from one cached 512² field, offset by position (cheap for huge slides)."""
    field = _noise_field(seed)
    h, w = img.shape[:2]
    oy, ox = int(y0 / ds) % 512, int(x0 / ds) % 512
    rows = (np.arange(h) + oy) % 512
    cols = (np.arange(w) + ox) % 512
    img += field[np.ix_(rows, cols)][..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _tiles(scene: Scene, width: int, height: int, ds: float, tile: int) -> Iterator[np.ndarray]:
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            yield scene.render(tx * ds, ty * ds, tile, tile, ds)


def write_synthetic_svs(
    path: str | Path,
    scene: Scene,
    mpp: float = 0.25,
    app_mag: float = 40,
    downsamples: tuple[float, ...] = (4, 16),
    tile: int = 256,
    quality: int = 85,
) -> Path:
    """Write `scene` as a tiled-JPEG Aperio SVS pyramid that OpenSlide opens as vendor `aperio`.

    Level sizes are floor(level-0 size / downsample), so non-power-of-two downsamples (e.g. 3) are
    allowed. Written atomically, tile by tile.
    """
    path = Path(path)
    w0, h0 = scene.width, scene.height
    desc0 = (
        f"Aperio Image Library v12.0.16 (synthetic)\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q={quality}"
        f"|AppMag = {app_mag:g}|MPP = {mpp:g}|Filename = {path.stem}"
    )
    bigtiff = w0 * h0 * 3 > 2**31
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            opts = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": quality})
            tif.write(_tiles(scene, w0, h0, 1.0, tile), shape=(h0, w0, 3), dtype=np.uint8, description=desc0,
                      metadata=None, **opts)
            # Aperio's second directory is a stripped thumbnail; OpenSlide expects it there.
            tds = max(w0, h0) / 768.0
            tw, th = max(1, int(w0 / tds)), max(1, int(h0 / tds))
            thumb = scene.render(0, 0, tw, th, w0 / tw)
            tif.write(thumb, photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                      description=f"Aperio Image Library v12.0.16 (synthetic)\r\n{w0}x{h0} -> {tw}x{th} - ;",
                      metadata=None)
            for ds in downsamples:
                lw, lh = int(w0 // ds), int(h0 // ds)
                if lw < 1 or lh < 1:
                    break
                exact = w0 / lw  # render so that level pixels map exactly onto level-0 coordinates
                tif.write(_tiles(scene, lw, lh, exact, tile), shape=(lh, lw, 3), dtype=np.uint8,
                          description=f"Aperio Image Library v12.0.16 (synthetic)\r\n{w0}x{h0} -> {lw}x{lh} - "
                          f"|AppMag = {app_mag:g}|MPP = {mpp:g}",
                          metadata=None, subfiletype=0, **opts)
    return path


def write_blank_svs(path: str | Path, width: int = 2048, height: int = 2048, mpp: float = 0.25) -> Path:
    """An SVS with glass only: segmentation must find no tissue."""
    scene = Scene(width, height, APPEARANCES["generic"], seed=0, blobs=[])
    return write_synthetic_svs(path, scene, mpp=mpp, downsamples=(4,))


def make_demo_slides(
    out_dir: str | Path,
    train_per_class: int = 6,
    test_per_class: int = 3,
    size: int = 4096,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
    workers: int = 1,
) -> Path:
    """Generate the demo cohort and `labels.csv` (slide_id, path, class_name, split, mpp).

    Slide ids are neutral (`demo-000`, ...) and classes are interleaved, so neither names nor order reveal
    the class. Returns the labels file.
    """
    out_dir = output_folder(out_dir, "--out")
    rows, jobs = [], []
    for slide_id, class_name, split, slide_seed in _demo_plan(train_per_class, test_per_class, seed, classes):
        path = out_dir / f"{slide_id}.svs"
        if not path.exists():
            jobs.append((path, size, class_name, slide_seed))
        rows.append({"slide_id": slide_id, "path": str(path), "class_name": class_name, "split": split, "mpp": 0.25})
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_demo_slide, jobs))
    else:
        for job in jobs:
            _write_demo_slide(job)
    labels = out_dir / "labels.csv"
    with atomic_path(labels) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_id", "path", "class_name", "split", "mpp"])
        writer.writeheader()
        writer.writerows(rows)
    return labels


def _demo_plan(
    train_per_class: int, test_per_class: int, seed: int, classes: tuple[str, ...]
) -> list[tuple[str, str, str, int]]:
    """(slide_id, class_name, split, scene seed) of each demo slide, in slide-id order."""
    rng = np.random.default_rng(seed)
    plan = [(c, "train") for c in classes for _ in range(train_per_class)]
    plan += [(c, "test") for c in classes for _ in range(test_per_class)]
    order = rng.permutation(len(plan))
    return [(f"demo-{index:03d}", *plan[k], seed * 1000 + index) for index, k in enumerate(order)]


def demo_scenes(
    train_per_class: int = 6, test_per_class: int = 3, size: int = 4096, seed: int = 0, classes: tuple[str, ...] = CLASSES
) -> list[tuple[str, str, Scene]]:
    """(slide_id, class_name, scene) of the slides `make_demo_slides` writes with the same arguments."""
    return [(slide_id, class_name, Scene.random(size, size, class_name, seed=slide_seed))
            for slide_id, class_name, _, slide_seed in _demo_plan(train_per_class, test_per_class, seed, classes)]


def _write_demo_slide(job: tuple[Path, int, str, int]) -> None:
    path, size, class_name, seed = job
    write_synthetic_svs(path, Scene.random(size, size, class_name, seed=seed), mpp=0.25)


def main(argv: list[str]) -> int:
    parser = command_parser("python -m preprocessing synth", __doc__,
                            "python -m preprocessing synth --out demo/slides --train-per-class 6 --test-per-class 3")
    parser.add_argument("--out", required=True, help="output folder (demo cohort) or file (--single/--blank)")
    parser.add_argument("--train-per-class", type=int, default=6, help="training slides per tissue class")
    parser.add_argument("--test-per-class", type=int, default=3, help="held-out slides per tissue class")
    parser.add_argument("--size", type=int, default=4096, help="level-0 width and height in px")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes")
    parser.add_argument("--workers", type=int, default=1, help="processes writing demo slides in parallel")
    parser.add_argument("--single", metavar="CLASS", choices=sorted(APPEARANCES),
                        help="write one slide of this class to --out (a .svs path)")
    parser.add_argument("--blank", action="store_true", help="write one slide with no tissue to --out")
    parser.add_argument("--width", type=int, help="with --single/--blank: level-0 width (default --size)")
    parser.add_argument("--height", type=int, help="with --single/--blank: level-0 height (default --size)")
    parser.add_argument("--mpp", type=float, default=0.25, help="with --single/--blank: level-0 µm/px recorded")
    parser.add_argument("--downsamples", type=float, nargs="+", default=[4, 16],
                        help="with --single: downsamples of the pyramid levels below level 0")
    args = parser.parse_args(argv)
    width, height = args.width or args.size, args.height or args.size
    if args.blank:
        write_blank_svs(args.out, width, height, args.mpp)
    elif args.single:
        scene = Scene.random(width, height, args.single, args.seed)
        write_synthetic_svs(args.out, scene, mpp=args.mpp, downsamples=tuple(args.downsamples))
    else:
        print(make_demo_slides(args.out, args.train_per_class, args.test_per_class, args.size, args.seed, workers=args.workers))
    return 0
