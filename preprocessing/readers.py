"""Patch readers: slide regions -> uint8 patches, written in place into shared batch memory.

This module does not import torch, on purpose: reader processes start from a fork server that preloads
only this module, and each costs tens of MB instead of the ~250 MB a torch import adds.

Where pixels come from (same pixels either way):
- `slide_tiles.TiledLevel`: for Aperio / generic tiled TIFF levels of JPEG or RGB JPEG 2000 tiles, the
  compressed tiles read from the file and decoded here (exactly OpenSlide's pixels, ~4x cheaper), or left
  compressed for the model's device to decode (`RegionTask.tiles == "bytes"`, see `TileCrops`);
- OpenSlide `read_region` into one reused buffer, for every other slide, region and rule.
Patches are cut (and resized) straight into their batch slot (`PatchRing`): no region is copied as a whole.

Pixel rules (`PIXEL_RULES`), i.e. how a patch is read and resized to `patch_size`:
- "nearest" (our default): the read-level pixel block nearest to the patch's level-0 corner, independent of
  how patches are grouped into regions; read_size -> patch_size by area averaging (cv2 INTER_AREA), as tiling
  defines a patch; transparent pixels composited onto the slide's background colour.
- "clam": CLAM's `extract_features_fp`: OpenSlide `read_region` at the level-0 corner (OpenSlide interpolates
  the sub-pixel offset at levels above 0), `convert("RGB")` (alpha dropped), PIL bilinear resize.
- "trident": TRIDENT's patcher: the same read, PIL bicubic resize (`tile.resize`).
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing as mp
import os
import queue
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory

import cv2
import numpy as np
import openslide
from PIL import Image

from preprocessing.slide import SlideError, WholeSlide, resize, slide_id_from_path
from preprocessing.slide_tiles import TiledLevel

PIXEL_RULES = ("nearest", "clam", "trident")
_PIL_FILTERS = {"clam": Image.Resampling.BILINEAR, "trident": Image.Resampling.BICUBIC}


# --------------------------------------------------------------------------------------------------
# Shared batch memory
# --------------------------------------------------------------------------------------------------
class PatchRing:
    """Batch slots in shared memory, uint8 `[slots, batch, P, P, 3]`: readers write patches where the batch is.

    The main process creates the ring and hands out (slot, index) places; readers attach by name (a reader
    in the creating process uses the creator's mapping, `PatchRing.attach`).
    """

    _created: dict[str, "PatchRing"] = {}  # rings this process created, by name

    def __init__(self, slots: int, batch: int, patch_size: int, name: str | None = None) -> None:
        shape = (slots, batch, patch_size, patch_size, 3)
        self.owner = name is None
        if self.owner:
            # whole pages: the main process may page-lock the segment for DMA to a GPU (cudaHostRegister)
            self.shm = SharedMemory(create=True, size=-(-int(np.prod(shape)) // mmap.PAGESIZE) * mmap.PAGESIZE)
            PatchRing._created[self.shm.name] = self
        else:
            # Python < 3.13 registers an attached segment with the resource tracker too. Readers start from
            # the fork server, which shares the creator's tracker: there the second registration is a no-op,
            # and unregistering it (as an own tracker would need) made the tracker print a KeyError traceback
            # when the creator unlinked the segment, and lose it if the creator was killed first.
            self.shm = SharedMemory(name=name)
        self.array = np.ndarray(shape, np.uint8, buffer=self.shm.buf)

    @classmethod
    def attach(cls, name: str, shape: tuple[int, ...]) -> "PatchRing":
        return cls._created.get(name) or cls(shape[0], shape[1], shape[2], name=name)

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def close(self) -> None:
        del self.array
        self.shm.close()
        if self.owner:
            PatchRing._created.pop(self.shm.name, None)
            self.shm.unlink()


# --------------------------------------------------------------------------------------------------
# Tasks and results
# --------------------------------------------------------------------------------------------------
@dataclass
class RegionTask:
    """Read patches `rows` (level-0 corners `xy`) of one slide, each into its ring place `dest[i]`."""

    job: int
    slide: str
    mpp: float | None
    level: int
    read_size: int
    patch_size: int
    downsample_xy: tuple[float, float]
    rows: np.ndarray
    xy: np.ndarray  # (k, 2) level-0 (x, y) of `rows`
    ring: tuple[str, tuple[int, ...]] | None  # (shared-memory name, shape) of the PatchRing; None: see `tiles`
    dest: np.ndarray  # (k, 2) (slot, index) of each patch in the ring
    pixels: str = "nearest"
    tiles: str = "decode"  # "decode": decode tiles here when possible; "bytes": return JPEG tiles compressed; "off"


@dataclass
class TileCrops:
    """One region's JPEG tiles, still compressed, and where its patches lie on them (decoded on the device)."""

    streams: list[bytes]  # self-contained JPEG streams, row-major over the tile grid
    grid: tuple[int, int]  # (rows, columns) of tiles
    tile_hw: tuple[int, int]
    offsets: np.ndarray  # (k, 2) patch top-left (x, y) in pixels of the tile grid
    read_size: int


@dataclass
class RegionResult:
    job: int
    rows: np.ndarray
    dest: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)  # position in `rows` -> error message
    fatal: str | None = None  # the slide could not be opened at all
    read_s: float = 0.0  # wall seconds in the reader
    cpu_s: float = 0.0  # CPU seconds of the reader process for this task
    source: str = "openslide"  # "tiles" | "openslide" | "tile-bytes"
    pid: int = 0
    crops: TileCrops | None = None  # tiles == "bytes"
    pixels: np.ndarray | None = None  # tiles == "bytes" but the tile path did not apply: patches read here


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
class OpenedSlide:
    """One slide as a reader holds it: the OpenSlide handle, a file descriptor and its tiled levels."""

    def __init__(self, path: str, mpp: float | None) -> None:
        self.ws = WholeSlide(path, mpp_override=mpp)
        self.fd = os.open(path, os.O_RDONLY)
        self._levels: dict[int, TiledLevel | None] = {}

    def tiled(self, level: int) -> TiledLevel | None:
        if level not in self._levels:
            self._levels[level] = TiledLevel.open(str(self.ws.path), level, self.ws.level_dimensions[level], self.ws.vendor)
        return self._levels[level]

    def close(self) -> None:
        os.close(self.fd)
        self.ws.close()


class Reader:
    """A reader's state: open slides (reopened after an error: OpenSlide errors are sticky), attached rings,
    decoded tiles of recent regions and reusable buffers, so steady-state reading allocates nothing large."""

    def __init__(self, max_open: int = 4, cached_tiles: int = 96) -> None:
        self.max_open = max_open
        self._slides: OrderedDict[str, OpenedSlide] = OrderedDict()
        self._rings: dict[str, PatchRing] = {}
        self._tiles: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cached_tiles = cached_tiles
        self._argb = np.empty(0, np.uint32)
        self._scratch = np.empty(0, np.uint8)

    # -- resources ------------------------------------------------------------------------------------
    def slide(self, path: str, mpp: float | None) -> OpenedSlide:
        s = self._slides.get(path)
        if s is None:
            if len(self._slides) >= self.max_open:
                self._slides.popitem(last=False)[1].close()
            s = self._slides[path] = OpenedSlide(path, mpp)
        return s

    def reset(self, path: str) -> None:
        s = self._slides.pop(path, None)
        for key in [k for k in self._tiles if k[0] == path]:
            del self._tiles[key]
        if s is not None:
            try:
                s.close()
            except Exception:  # closing a handle in error state must not hide the read error
                pass

    def ring(self, handle: tuple[str, tuple[int, ...]]) -> np.ndarray:
        name, shape = handle
        r = self._rings.get(name)
        if r is None:
            r = self._rings[name] = PatchRing.attach(name, shape)
        return r.array

    def close(self) -> None:
        for path in list(self._slides):
            self.reset(path)
        for r in self._rings.values():
            if not r.owner:  # the creator closes its own rings
                r.close()
        self._rings.clear()

    def _buffer(self, attr: str, n: int, dtype: type) -> np.ndarray:
        buf = getattr(self, attr)
        if buf.size < n:
            buf = np.empty(n, dtype)
            setattr(self, attr, buf)
        return buf[:n]

    # -- one task -------------------------------------------------------------------------------------
    def read(self, task: RegionTask) -> RegionResult:
        """Read one region task into its ring places; errors become per-patch entries, never exceptions."""
        t0, c0 = time.perf_counter(), time.process_time()
        res = RegionResult(task.job, task.rows, task.dest, pid=os.getpid())
        try:
            slide = self.slide(task.slide, task.mpp)
        except SlideError as exc:
            res.fatal = str(exc)
            return res
        k, p = len(task.rows), task.patch_size
        if task.ring is None:
            res.pixels = np.empty((k, p, p, 3), np.uint8)
            targets = list(res.pixels)
        else:
            ring = self.ring(task.ring)
            targets = [ring[s, i] for s, i in task.dest]
        gx = np.round(task.xy[:, 0] / task.downsample_xy[0]).astype(np.int64)
        gy = np.round(task.xy[:, 1] / task.downsample_xy[1]).astype(np.int64)
        done = False
        if task.tiles != "off" and (task.pixels == "nearest" or task.level == 0):
            done = self._from_tiles(task, slide, gx, gy, targets, res)
        if not done:
            self._from_openslide(task, slide, gx, gy, targets, res)
        res.read_s, res.cpu_s = time.perf_counter() - t0, time.process_time() - c0
        return res

    def _from_tiles(self, task: RegionTask, slide: OpenedSlide, gx: np.ndarray, gy: np.ndarray,
                    targets: list[np.ndarray], res: RegionResult) -> bool:
        """Cut the patches out of the level's own tiles; False when the tile path does not apply or fails."""
        tl = slide.tiled(task.level)
        rs = task.read_size
        x0, y0 = int(gx.min()), int(gy.min())
        w, h = int(gx.max()) - x0 + rs, int(gy.max()) - y0 + rs
        if tl is None or not tl.contains(x0, y0, w, h):
            return False
        c0, r0, c1, r1 = tl.tile_range(x0, y0, w, h)
        if task.tiles == "bytes" and tl.codec == "jpeg" and task.pixels == "nearest":
            try:
                streams = [tl.jpeg_stream(tl.read(slide.fd, c, r)) for r in range(r0, r1) for c in range(c0, c1)]
            except OSError:
                return False
            offsets = np.stack([gx - c0 * tl.tile_w, gy - r0 * tl.tile_h], axis=1)
            res.crops = TileCrops(streams, (r1 - r0, c1 - c0), (tl.tile_h, tl.tile_w), offsets, rs)
            res.pixels, res.source = None, "tile-bytes"
            return True
        scratch = self._buffer("_scratch", rs * rs * 3, np.uint8).reshape(rs, rs, 3)
        try:
            for i, target in enumerate(targets):
                x, y = int(gx[i]), int(gy[i])
                patch = target if rs == task.patch_size and task.pixels == "nearest" else scratch
                pc0, pr0, pc1, pr1 = tl.tile_range(x, y, rs, rs)
                for r in range(pr0, pr1):  # copy the part of each tile the patch overlaps (decoded once per region)
                    for c in range(pc0, pc1):
                        tile = self._tile(task.slide, slide, tl, c, r)
                        tx0, ty0 = c * tl.tile_w, r * tl.tile_h
                        ax0, ay0 = max(x, tx0), max(y, ty0)
                        ax1, ay1 = min(x + rs, tx0 + tl.tile_w), min(y + rs, ty0 + tl.tile_h)
                        patch[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0]
                if patch is scratch:
                    _fit_into(scratch, target, task.pixels)
        except (OSError, RuntimeError, ValueError):  # damaged tile: OpenSlide re-reads and isolates the patches
            return False
        res.source = "tiles"
        return True

    def _tile(self, path: str, slide: OpenedSlide, tl: TiledLevel, col: int, row: int) -> np.ndarray:
        key = (path, tl.level, col, row)
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
            return tile
        out = None
        if len(self._tiles) >= self._cached_tiles:  # reuse the oldest tile's memory
            _, out = self._tiles.popitem(last=False)
            if out.shape != (tl.tile_h, tl.tile_w, 3):
                out = None
        tile = tl.decode(tl.read(slide.fd, col, row), out=out)
        self._tiles[key] = tile
        return tile

    def _read_bgra(self, slide: OpenedSlide, xy0: tuple[int, int], level: int, w: int, h: int) -> np.ndarray:
        """OpenSlide's premultiplied ARGB for a region, as a (h, w, 4) B,G,R,A view of a reused buffer.

        openslide-python's `read_region` allocates and zero-fills a fresh buffer, converts it to straight RGBA
        and wraps it in PIL, and `np.asarray` copies it again: ~2 ms per 40x patch. The C call it wraps
        (`lowlevel._read_region`, openslide-python 1.4) writes into any buffer we pass.
        """
        buf = self._buffer("_argb", w * h, np.uint32)
        osr = slide.ws._osr._osr  # the C handle behind openslide.OpenSlide
        openslide.lowlevel._read_region(osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                                        int(xy0[0]), int(xy0[1]), level, w, h)
        return buf.view(np.uint8).reshape(h, w, 4)  # little-endian ARGB words are B, G, R, A bytes

    def _from_openslide(self, task: RegionTask, slide: OpenedSlide, gx: np.ndarray, gy: np.ndarray,
                        targets: list[np.ndarray], res: RegionResult) -> None:
        """One OpenSlide region read, patches cut at their read-level pixel (per-patch reads where that differs).

        A region starts at the level-0 point nearest to its first level pixel; at a level whose downsample is
        not an integer OpenSlide then interpolates that region by a sub-pixel shift (the tile path does not).
        CLAM and TRIDENT read each patch at its level-0 corner: above level 0 that is a per-patch read.
        """
        res.source = "openslide"
        if task.pixels != "nearest" and task.level != 0:
            self._as_the_tool_reads(task, targets, res)
            return
        dx, dy = task.downsample_xy
        rs, p = task.read_size, task.patch_size
        x0, y0 = int(gx.min()), int(gy.min())
        ox, oy = gx - x0, gy - y0
        w, h = int(ox.max()) + rs, int(oy.max()) + rs
        origin = (round(x0 * dx), round(y0 * dy))
        try:
            bgra = self._read_bgra(slide, origin, task.level, w, h)
            if bgra[..., 3].min() == 255:
                rgb = self._buffer("_scratch", rs * rs * 3, np.uint8).reshape(rs, rs, 3)
                for i, target in enumerate(targets):
                    roi = bgra[oy[i] : oy[i] + rs, ox[i] : ox[i] + rs]
                    cv2.cvtColor(roi, cv2.COLOR_BGRA2RGB, dst=target if rs == p and task.pixels == "nearest" else rgb)
                    if rs != p or task.pixels != "nearest":
                        _fit_into(rgb, target, task.pixels)
            elif task.pixels == "nearest":  # transparent pixels: composite straight RGBA onto the background
                region = slide.ws.read_region(origin, task.level, (w, h))
                for i, target in enumerate(targets):
                    target[:] = resize(region[oy[i] : oy[i] + rs, ox[i] : ox[i] + rs], (p, p))
            else:
                self._as_the_tool_reads(task, targets, res)
            return
        except (SlideError, openslide.OpenSlideError):
            self.reset(task.slide)
        if task.pixels != "nearest":
            self._as_the_tool_reads(task, targets, res)
            return
        for i, target in enumerate(targets):  # re-read patch by patch on a fresh handle, isolating failures
            try:
                ws = self.slide(task.slide, task.mpp).ws
                patch = ws.read_region((round(int(gx[i]) * dx), round(int(gy[i]) * dy)), task.level, (rs, rs))
                target[:] = resize(patch, (p, p))
            except SlideError as exc:
                self.reset(task.slide)
                target[:] = 0
                res.errors[i] = str(exc)

    def _as_the_tool_reads(self, task: RegionTask, targets: list[np.ndarray], res: RegionResult) -> None:
        """CLAM / TRIDENT: OpenSlide `read_region(xy, level, (rs, rs)).convert("RGB")` per patch, PIL resize."""
        rs = task.read_size
        for i in range(len(targets)):
            xy = (int(task.xy[i, 0]), int(task.xy[i, 1]))
            try:
                opened = self.slide(task.slide, task.mpp)
                rgb = np.asarray(opened.ws._osr.read_region(xy, task.level, (rs, rs)).convert("RGB"))
            except (SlideError, openslide.OpenSlideError) as exc:
                self.reset(task.slide)
                targets[i][:] = 0
                res.errors[i] = f"slide {slide_id_from_path(task.slide)}: cannot read patch at {xy}, level {task.level}: {exc}"
                continue
            _fit_into(rgb, targets[i], task.pixels)


def _fit_into(patch: np.ndarray, target: np.ndarray, pixels: str) -> None:
    """Resize an RGB patch into `target` (P, P, 3) by the rule's resampling (no-op copy at equal size)."""
    p = target.shape[0]
    if pixels == "nearest":
        if patch.shape[0] == p:
            target[:] = patch
        else:
            cv2.resize(patch, (p, p), dst=target, interpolation=cv2.INTER_AREA if patch.shape[0] > p else cv2.INTER_CUBIC)
    else:
        image = Image.fromarray(patch)
        if image.size != (p, p):
            image = image.resize((p, p), _PIL_FILTERS[pixels])
        target[:] = np.asarray(image)


# --------------------------------------------------------------------------------------------------
# Reader processes
# --------------------------------------------------------------------------------------------------
def _worker_main(tasks: "mp.Queue[RegionTask | None]", results: "mp.Queue[RegionResult]", parent_pid: int) -> None:
    cv2.setNumThreads(1)  # one process per core; no nested thread pools
    reader = Reader()
    try:
        while True:
            try:
                task = tasks.get(timeout=2.0)
            except queue.Empty:
                if not _alive(parent_pid):  # the main process was killed: do not linger as an orphan
                    break
                continue
            if task is None:
                break
            try:
                res = reader.read(task)
            except Exception as exc:  # report anything unexpected to the main process instead of dying silently
                res = RegionResult(task.job, task.rows, task.dest, pid=os.getpid(),
                                   fatal=f"reader failed on {task.slide}: {type(exc).__name__}: {exc}")
            results.put(res)
    finally:
        reader.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReaderPool:
    """Long-lived reader processes shared by all slides of a run (or in-process reads when n == 0)."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self._local: list[RegionTask] = []
        self._reader = Reader() if num_workers == 0 else None
        self._procs: list[mp.process.BaseProcess] = []
        if num_workers > 0:
            # forkserver, not fork: forking a process whose OpenCV/OpenMP/GLib thread pools are running can
            # deadlock the child (seen: cv2 after tissue segmentation in the same process). The fork server is
            # a clean single-threaded process started once per Python process with only this torch-free module
            # preloaded, so each pool starts in well under a second and each reader stays small.
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            self._tasks = ctx.Queue()
            self._results = ctx.Queue()
            for _ in range(num_workers):
                proc = ctx.Process(target=_worker_main, args=(self._tasks, self._results, os.getpid()), daemon=True)
                proc.start()
                self._procs.append(proc)

    def submit(self, task: RegionTask) -> None:
        if self.num_workers == 0:
            self._local.append(task)
        else:
            self._tasks.put(task)

    def get(self) -> RegionResult:
        if self.num_workers == 0:
            assert self._reader is not None
            return self._reader.read(self._local.pop(0))
        while True:
            try:
                return self._results.get(timeout=5.0)
            except queue.Empty:
                dead = [p.pid for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"reader process(es) {dead} died (out of memory or a crash in the slide library)")

    def close(self, abort: bool = False) -> None:
        """Stop the readers: politely after a finished run, at once after an error (queued reads are moot)."""
        if self._reader is not None:
            self._reader.close()
        if abort:
            for p in self._procs:
                p.terminate()
        else:
            for _ in self._procs:
                self._tasks.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> "ReaderPool":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(abort=exc_type is not None)
