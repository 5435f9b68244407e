"""Batched patch-feature extraction: coords file + slide -> one feature store per slide.

Data path (built so the accelerator does not wait):
- The main process plans, for each slide, *regions*: blocks of neighbouring patches read with one
  `read_region` at the read level and cut into patches, instead of one OpenSlide call per patch.
- One long-lived pool of reader processes serves all slides of a run; each keeps its own OpenSlide
  handles. Region tasks of the next slide are queued while this slide's batches are on the model, so
  reads overlap compute across slide boundaries.
- Patches travel as uint8 tensors through shared memory, are pinned when CUDA is used, and are resized
  and normalised on the device (`PatchEncoder.preprocess`); inference runs under `torch.inference_mode`,
  in bf16 autocast on CUDA and fp32 on CPU. On CUDA each batch's result is copied back asynchronously
  while the next batch runs.
- A region that cannot be read (e.g. a corrupt JPEG tile) is re-read patch by patch on a fresh handle;
  patches that still fail are stored as invalid (`valid == False`) and reported, the rest is extracted.

Outputs are resumable: rows are written in chunks to a hidden partial store with a marker per finished
chunk; a killed run continues from the markers, the final store appears by an atomic rename, and a rerun
whose store already exists with the same parameters does nothing. A store (final or partial) made with
other parameters is never extended: that is an error telling the user what differs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers shared-memory pickling of tensors for the worker queues)

from preprocessing.encoders import TRANSFORMS, EncoderCheckpointError, PatchEncoder, build_encoder
from preprocessing.slide import SlideError, WholeSlide, resize
from preprocessing.stores import (
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    PartialZarrStore,
    StoreError,
    read_store_attrs,
    software_versions,
    write_h5_store,
)
from wsicore.cli import command_parser
from wsicore.files import jsonable
from wsicore.settings import add_arguments, from_arguments, setting

log = logging.getLogger("preprocessing.extract")

# Attributes that identify a store's content; a store whose values differ is never reused or extended.
IDENTITY_KEYS = (
    "encoder", "encoder_config", "feature_dim", "checkpoint_sha256", "seed", "transform", "transform_spec",
    "dtype", "precision", "coords_sha256",
)


@dataclass
class ExtractOptions:
    """Patch-feature extraction (config section `features`; flags of `python -m preprocessing extract`)."""

    # The real encoder by default: random weights are never what a run gets without asking for them.
    encoder: str = setting("conch_v1", help="patch encoder: conch_v1 | conch_tiny | resnet50_trunc | timm:<name>")
    checkpoint: str | None = setting(
        None, help="local weights file of the encoder (CONCH's pytorch_model.bin); required for conch_v1")
    transform: str | None = setting(
        None, choices=sorted(TRANSFORMS),
        help="input transform; null = the encoder's own (conch_v1: conch_official, conch_tiny: slidechat)")
    fmt: str = setting("zarr", key="format", choices=["zarr", "h5"], help="feature store format")
    dtype: str | None = setting(
        None, choices=["float16", "float32"], help="stored feature dtype; null = float16 (zarr) or float32 (h5)")
    batch_size: int = setting(64, help="patches per forward pass", minimum=1)
    num_workers: int = setting(1, help="reader processes; 0 reads in the main process", minimum=0)
    chunk_rows: int = setting(2048, help="rows per Zarr chunk and per resume step", minimum=1)
    region_px: int = setting(2048, help="longest side of one region read, in read-level pixels", minimum=1)
    prefetch: int = setting(4, help="region tasks in flight per reader", minimum=1)
    device: str | None = setting(None, help="torch device (cuda, cuda:1, cpu); null = cuda when available, else cpu")
    seed: int = setting(0, help="seed of random weights (conch_tiny, allow_random_weights)")
    allow_random: bool = setting(
        False, key="allow_random_weights", config=False, help="run a real encoder without a checkpoint (benchmarks)")
    overwrite: bool = setting(False, config=False, help="replace an existing store made with other parameters")
    progress_every_s: float = setting(
        10.0, key="progress_every", help="seconds between progress lines in the log", exclusive_minimum=0)

    def __post_init__(self) -> None:
        if self.fmt not in {"zarr", "h5"}:
            raise ValueError(f"format must be 'zarr' or 'h5', got {self.fmt!r} (option --format)")
        if self.batch_size < 1 or self.chunk_rows < 1 or self.region_px < 1 or self.num_workers < 0:
            raise ValueError("batch_size, chunk_rows and region_px must be >= 1 and num_workers >= 0")

    @property
    def store_dtype(self) -> str:
        return self.dtype or ("float16" if self.fmt == "zarr" else "float32")


@dataclass
class SlideJob:
    """One slide to extract: the slide file, its coords file, and an optional mpp override."""

    slide: Path
    coords: Path
    mpp: float | None = None


# --------------------------------------------------------------------------------------------------
# Coordinates and region planning
# --------------------------------------------------------------------------------------------------
@dataclass
class PatchPlan:
    slide_id: str
    coords: np.ndarray  # (N, 2) int64 level-0
    coords_attrs: dict
    read_level: int
    read_size: int
    patch_size: int
    downsample_xy: tuple[float, float]


def read_coords(path: str | Path) -> PatchPlan:
    """The coords file (tiling contract) as a plan: coords plus the geometry needed to read the patches."""
    from preprocessing.tiling import load_coords

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"coords file not found: {path}")
    coords, attrs = load_coords(path)
    try:
        level = int(attrs.get("read_level", attrs.get("patch_level")))
        patch_size = int(attrs["patch_size"])
        read_size = int(attrs.get("read_size", patch_size))
        ds = attrs.get("read_downsample_xy", attrs.get("downsample", (1.0, 1.0)))
        ds_xy = (float(np.ravel(ds)[0]), float(np.ravel(ds)[-1]))
    except (KeyError, TypeError) as exc:
        raise StoreError(f"{path}: coords attributes incomplete ({exc}); re-run tiling") from exc
    slide_id = str(attrs.get("slide_id") or path.stem)
    if Path(slide_id).name != slide_id or slide_id in (".", ".."):  # the store is named after it
        raise StoreError(f"{path}: records slide_id {slide_id!r}, which is not a file name; a store named after it "
                         "would be written outside the output folder. Re-run tiling for this slide")
    return PatchPlan(slide_id, coords, jsonable(attrs), level, read_size, patch_size, ds_xy)


def plan_regions(coords: np.ndarray, rows: np.ndarray, downsample_xy: tuple[float, float], read_size: int,
                 region_px: int) -> list[np.ndarray]:
    """Group the patches `rows` into square blocks of about `region_px` read-level pixels.

    Returns row-index arrays in band order (top to bottom, left to right), so chunks of the tiling order
    complete early and the buffers stay small.
    """
    if len(rows) == 0:
        return []
    xy = coords[rows].astype(np.float64)
    lx = xy[:, 0] / downsample_xy[0]
    ly = xy[:, 1] / downsample_xy[1]
    block = max(1, region_px // max(1, read_size)) * read_size
    bx = np.floor((lx - lx.min()) / block).astype(np.int64)
    by = np.floor((ly - ly.min()) / block).astype(np.int64)
    key = by * (int(bx.max()) + 1) + bx
    order = np.lexsort((rows, key))
    key_sorted = key[order]
    cuts = np.flatnonzero(np.diff(key_sorted)) + 1
    return [rows[g] for g in np.split(order, cuts)]


# --------------------------------------------------------------------------------------------------
# Readers (run in worker processes, or in the main process when num_workers == 0)
# --------------------------------------------------------------------------------------------------
@dataclass
class RegionTask:
    job: int
    slide: str
    mpp: float | None
    level: int
    read_size: int
    patch_size: int
    downsample_xy: tuple[float, float]
    rows: np.ndarray
    xy: np.ndarray  # level-0 (x, y) of `rows`


@dataclass
class RegionResult:
    job: int
    rows: np.ndarray
    patches: Any  # torch.Tensor uint8 (k, P, P, 3) (shared memory when from a worker)
    errors: dict[int, str] = field(default_factory=dict)  # position in `rows` -> error message
    fatal: str | None = None  # the slide could not be opened at all
    read_seconds: float = 0.0


class SlideHandles:
    """OpenSlide handles owned by one reader, reopened after an error (OpenSlide errors are sticky)."""

    def __init__(self, max_open: int = 4) -> None:
        self.max_open = max_open
        self._open: dict[str, WholeSlide] = {}

    def get(self, path: str, mpp: float | None) -> WholeSlide:
        ws = self._open.get(path)
        if ws is None:
            if len(self._open) >= self.max_open:
                oldest = next(iter(self._open))
                self._open.pop(oldest).close()
            ws = WholeSlide(path, mpp_override=mpp)
            self._open[path] = ws
        return ws

    def reset(self, path: str) -> None:
        ws = self._open.pop(path, None)
        if ws is not None:
            try:
                ws.close()
            except Exception:  # closing a handle in error state must not hide the read error
                pass

    def close(self) -> None:
        for path in list(self._open):
            self.reset(path)


def read_task(task: RegionTask, handles: SlideHandles) -> RegionResult:
    """Read one region and cut its patches; fall back to per-patch reads if the region read fails."""
    t0 = time.perf_counter()
    k, p = len(task.rows), task.patch_size
    out = np.empty((k, p, p, 3), np.uint8)
    errors: dict[int, str] = {}
    dx, dy = task.downsample_xy
    try:
        ws = handles.get(task.slide, task.mpp)
    except SlideError as exc:
        return RegionResult(task.job, task.rows, torch.empty(0, dtype=torch.uint8), fatal=str(exc))
    # Every patch starts at the read-level pixel nearest to its level-0 corner, whatever region it falls in:
    # the pixels do not depend on how patches were grouped (or regrouped on resume), and no region starts
    # between level pixels, where OpenSlide would interpolate. At level 0 this is exactly the per-patch read.
    gx = np.round(task.xy[:, 0] / dx).astype(np.int64)
    gy = np.round(task.xy[:, 1] / dy).astype(np.int64)
    gx0, gy0 = int(gx.min()), int(gy.min())
    ox, oy = gx - gx0, gy - gy0
    rs = task.read_size
    try:
        region = ws.read_region((round(gx0 * dx), round(gy0 * dy)), task.level,
                                (int(ox.max()) + rs, int(oy.max()) + rs))
        for i in range(k):
            out[i] = _fit(region[oy[i] : oy[i] + rs, ox[i] : ox[i] + rs], p)
    except SlideError:
        handles.reset(task.slide)
        for i in range(k):
            try:
                ws = handles.get(task.slide, task.mpp)
                patch = ws.read_region((round(int(gx[i]) * dx), round(int(gy[i]) * dy)), task.level, (rs, rs))
                out[i] = _fit(patch, p)
            except SlideError as exc:
                handles.reset(task.slide)
                out[i] = 0
                errors[i] = str(exc)
    return RegionResult(task.job, task.rows, torch.from_numpy(out), errors, read_seconds=time.perf_counter() - t0)


def _fit(patch: np.ndarray, size: int) -> np.ndarray:
    """read_size -> patch_size (area averaging when shrinking, as tiling defines a patch at the target mpp)."""
    return patch if patch.shape[0] == size and patch.shape[1] == size else resize(patch, (size, size))


def _worker_main(tasks: "mp.Queue[RegionTask | None]", results: "mp.Queue[RegionResult]", parent_pid: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; no nested thread pools
    torch.set_num_threads(1)
    handles = SlideHandles()
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
                res = read_task(task, handles)
            except Exception as exc:  # report anything unexpected to the main process instead of dying silently
                res = RegionResult(task.job, task.rows, torch.empty(0, dtype=torch.uint8),
                                   fatal=f"reader failed on {task.slide}: {type(exc).__name__}: {exc}")
            results.put(res)
    finally:
        handles.close()


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
        self._local: deque[RegionTask] = deque()
        self._handles = SlideHandles() if num_workers == 0 else None
        self._procs: list[mp.process.BaseProcess] = []
        if num_workers > 0:
            # forkserver, not fork: forking a process whose OpenCV/OpenMP/GLib thread pools are running can
            # deadlock the child (seen: cv2 after tissue segmentation in the same process). The fork server is
            # a clean single-threaded process started once per Python process, with this module preloaded,
            # so each pool still starts in well under a second.
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
            assert self._handles is not None
            return read_task(self._local.popleft(), self._handles)
        while True:
            try:
                return self._results.get(timeout=5.0)
            except queue.Empty:
                dead = [p.pid for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"reader process(es) {dead} died (out of memory or a crash in the slide library)")

    def close(self, abort: bool = False) -> None:
        """Stop the readers: politely after a finished run, at once after an error (queued reads are moot)."""
        if self._handles is not None:
            self._handles.close()
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


# --------------------------------------------------------------------------------------------------
# Model stage
# --------------------------------------------------------------------------------------------------
class ModelRunner:
    """Runs the encoder on uint8 batches; on CUDA the copy back overlaps the next batch."""

    def __init__(self, encoder: PatchEncoder) -> None:
        self.encoder = encoder
        self.device = encoder.device
        self.cuda = self.device.type == "cuda"
        self.precision = "bf16" if self.cuda else "fp32"
        self.busy_seconds = 0.0  # time spent inside the model stage (CPU) / GPU event time (CUDA)
        self._events: list[tuple[Any, Any]] = []

    def launch(self, batch: torch.Tensor) -> Callable[[], np.ndarray]:
        """Start the model on `batch`; returns a function that waits for and returns features (B, D) fp32."""
        t0 = time.perf_counter()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            batch = batch.pin_memory()
            start.record()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                feats = self.encoder(self.encoder.preprocess(batch))
            host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(feats.float(), non_blocking=True)
            end.record()
            self._events.append((start, end))

            def wait() -> np.ndarray:
                end.synchronize()
                return host.numpy()

            return wait
        with torch.inference_mode():
            out = self.encoder(self.encoder.preprocess(batch)).float().numpy()
        self.busy_seconds += time.perf_counter() - t0
        return lambda: out

    def gpu_busy_seconds(self) -> float:
        if not self.cuda:
            return self.busy_seconds
        torch.cuda.synchronize()
        total = sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        self._events.clear()
        self.busy_seconds += total
        return self.busy_seconds


# --------------------------------------------------------------------------------------------------
# Per-slide state
# --------------------------------------------------------------------------------------------------
def _sha256_coords(plan: PatchPlan) -> str:
    h = hashlib.sha256(np.ascontiguousarray(plan.coords, dtype=np.int64).tobytes())
    h.update(f"{plan.read_level}|{plan.read_size}|{plan.patch_size}|{plan.downsample_xy}".encode())
    return h.hexdigest()


def store_path(out_dir: str | Path, slide_id: str, fmt: str) -> Path:
    return Path(out_dir) / f"{slide_id}.{fmt}"


def _partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial.zarr")


def _identity_diff(existing: dict, wanted: dict) -> list[str]:
    return [f"{k}: store has {existing.get(k)!r}, requested {wanted.get(k)!r}"
            for k in IDENTITY_KEYS if jsonable(existing.get(k)) != jsonable(wanted.get(k))]


class SlideState:
    """Bookkeeping for one slide in flight: pending regions, ready patches, chunk buffers, progress."""

    def __init__(self, index: int, job: SlideJob, plan: PatchPlan, store: PartialZarrStore, final: Path,
                 opts: ExtractOptions, feature_dim: int) -> None:
        self.index, self.job, self.plan, self.store, self.final = index, job, plan, store, final
        self.slide_id = plan.slide_id
        done = store.done_chunks()
        self.pending_chunks = set(range(store.n_chunks)) - done
        rows = np.concatenate([np.arange(*store.chunk_rows_of(i)) for i in sorted(self.pending_chunks)]) \
            if self.pending_chunks else np.zeros(0, np.int64)
        self.tasks: deque[RegionTask] = deque(
            RegionTask(index, str(job.slide), job.mpp, plan.read_level, plan.read_size, plan.patch_size,
                       plan.downsample_xy, r, plan.coords[r])
            for r in plan_regions(plan.coords, rows, plan.downsample_xy, plan.read_size, opts.region_px)
        )
        self.outstanding = 0  # submitted, not yet returned
        self.ready: deque[tuple[np.ndarray, torch.Tensor]] = deque()
        self.n_ready = 0
        self.in_model = 0  # patches launched but not yet stored
        self.chunk_feats: dict[int, np.ndarray] = {}
        self.chunk_valid: dict[int, np.ndarray] = {}
        self.chunk_left: dict[int, int] = {}
        for i in self.pending_chunks:
            a, b = store.chunk_rows_of(i)
            self.chunk_feats[i] = np.zeros((b - a, feature_dim), np.float32)
            self.chunk_valid[i] = np.ones(b - a, bool)
            self.chunk_left[i] = b - a
        self.errors: list[dict] = []
        self.total = len(rows)
        self.done_patches = 0
        self.t_start = time.perf_counter()
        self.t_log = self.t_start
        self.read_seconds = 0.0

    @property
    def all_returned(self) -> bool:
        return not self.tasks and self.outstanding == 0

    @property
    def finished(self) -> bool:
        return not self.pending_chunks

    def add_result(self, res: RegionResult) -> None:
        self.outstanding -= 1
        self.read_seconds += res.read_seconds
        for pos, msg in res.errors.items():
            r = int(res.rows[pos])
            x, y = (int(v) for v in self.plan.coords[r])
            self.errors.append({"index": r, "x": x, "y": y, "error": msg})
            log.warning("slide %s: patch %d at (%d, %d) unreadable, marked invalid: %s", self.slide_id, r, x, y, msg)
        self.ready.append((res.rows, res.patches))
        self.n_ready += len(res.rows)

    def take_batch(self, batch_size: int) -> tuple[np.ndarray, torch.Tensor]:
        rows, parts, n = [], [], 0
        while self.ready and n < batch_size:
            r, p = self.ready.popleft()
            take = min(batch_size - n, len(r))
            if take < len(r):
                self.ready.appendleft((r[take:], p[take:]))
                r, p = r[:take], p[:take]
            rows.append(r)
            parts.append(p)
            n += take
        self.n_ready -= n
        self.in_model += n
        return np.concatenate(rows), (parts[0] if len(parts) == 1 else torch.cat(parts))

    def store_features(self, rows: np.ndarray, feats: np.ndarray, after_chunk: Callable[[str, int], None] | None) -> None:
        self.in_model -= len(rows)
        chunk_rows = self.store.chunk_rows
        invalid = {e["index"] for e in self.errors}
        for chunk in np.unique(rows // chunk_rows):
            sel = rows // chunk_rows == chunk
            local = rows[sel] - chunk * chunk_rows
            i = int(chunk)
            self.chunk_feats[i][local] = feats[sel]
            self.chunk_valid[i][local] = [int(r) not in invalid for r in rows[sel]]
            self.chunk_left[i] -= int(sel.sum())
            if self.chunk_left[i] == 0:
                f = self.chunk_feats.pop(i)
                v = self.chunk_valid.pop(i)
                f[~v] = 0.0  # an unreadable patch has no features, not the features of a black square
                a, b = self.store.chunk_rows_of(i)
                errs = [e for e in self.errors if a <= e["index"] < b]
                self.store.write_chunk(i, f, v, {"errors": errs})
                self.pending_chunks.discard(i)
                if after_chunk is not None:
                    after_chunk(self.slide_id, i)
        self.done_patches += len(rows)

    def maybe_log(self, every_s: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.t_log < every_s:
            return
        self.t_log = now
        elapsed = max(now - self.t_start, 1e-9)
        rate = self.done_patches / elapsed
        left = self.total - self.done_patches
        eta = left / rate if rate > 0 else float("inf")
        log.info("slide %s: %d/%d patches, %.1f patches/s, ETA %s", self.slide_id, self.done_patches, self.total,
                 rate, _fmt_eta(eta))


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def extract_slides(
    jobs: Sequence[SlideJob | tuple],
    out_dir: str | Path,
    options: ExtractOptions | None = None,
    encoder: PatchEncoder | None = None,
    _after_chunk: Callable[[str, int], None] | None = None,
    stats: dict | None = None,
    **kwargs: Any,
) -> list[Path]:
    """Extract features for several slides with one encoder and one reader pool; returns the store paths.

    `jobs` are `SlideJob`s or `(slide, coords[, mpp])` tuples; `kwargs` set `ExtractOptions` fields.
    `encoder` may be passed pre-built (it must match `options.encoder`). `_after_chunk` is a test hook
    called after each chunk is on disk. `stats`, if given, is filled with wall/model-busy seconds and counts.
    """
    from preprocessing.tiling import check_coords_slide

    opts = options or ExtractOptions(**kwargs)
    if options is not None and kwargs:
        raise TypeError("pass either options or keyword settings, not both")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slide_jobs = [j if isinstance(j, SlideJob) else SlideJob(Path(j[0]), Path(j[1]), j[2] if len(j) > 2 else None)
                  for j in jobs]
    if encoder is None:
        device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder = build_encoder(opts.encoder, opts.checkpoint, opts.transform, device=device, seed=opts.seed,
                                allow_random=opts.allow_random)
    runner = ModelRunner(encoder)
    identity_base = {**encoder.describe(), "dtype": opts.store_dtype, "precision": runner.precision}

    outputs: list[Path] = []
    states: list[SlideState] = []
    for idx, job in enumerate(slide_jobs):
        plan = read_coords(job.coords)
        with WholeSlide(job.slide) as ws:  # coords of another slide would name a store after it
            check_coords_slide(plan.coords_attrs, ws, job.coords)
        final = store_path(out_dir, plan.slide_id, opts.fmt)
        outputs.append(final)
        identity = {**identity_base, "coords_sha256": _sha256_coords(plan)}
        if final.exists():
            diff = _identity_diff(read_store_attrs(final), identity)
            if not diff:
                log.info("slide %s: %s is up to date, nothing to do", plan.slide_id, final)
                continue
            if not opts.overwrite:
                raise StoreError(
                    f"{final} exists with other parameters ({'; '.join(diff)}); features made differently must "
                    f"go to a different output directory (or pass --overwrite to replace it)"
                )
        attrs = _store_attrs(plan, job, encoder, identity, opts)
        store = _open_partial(_partial_path(final), plan, encoder.feature_dim, opts, attrs, identity)
        if len(plan.coords) == 0:
            _finalize(store, final, plan, opts)
            continue
        states.append(SlideState(idx, job, plan, store, final, opts, encoder.feature_dim))

    if states:
        log.info("extracting %d slide(s), %d patches, encoder %s (%s), %s, %d reader(s), batch %d", len(states),
                 sum(s.total for s in states), encoder.name, encoder.transform.name, runner.precision,
                 opts.num_workers, opts.batch_size)
        with ReaderPool(opts.num_workers) as pool:
            run_stats = _run(states, pool, runner, opts, _after_chunk)
        if stats is not None:
            stats.update(run_stats)
    return outputs


def _run(states: list[SlideState], pool: ReaderPool, runner: ModelRunner, opts: ExtractOptions,
         after_chunk: Callable[[str, int], None] | None) -> dict:
    by_index = {s.index: s for s in states}
    order = deque(states)  # slides not yet finalised, in order
    max_inflight = max(1, opts.num_workers) * opts.prefetch
    inflight = 0
    launched: deque[tuple[SlideState, np.ndarray, Callable[[], np.ndarray]]] = deque()
    t0 = time.perf_counter()

    def submit_more() -> None:
        nonlocal inflight
        for s in order:  # the current slide first, then the next ones: reads overlap across slides
            while s.tasks and inflight < max_inflight:
                s.outstanding += 1
                inflight += 1
                pool.submit(s.tasks.popleft())
            if inflight >= max_inflight:
                return

    def collect(block_all: bool) -> None:
        # Store finished batches; on CUDA keep two in flight so the GPU always has queued work while the
        # main process assembles the next batch and writes results.
        keep = 0 if block_all or not runner.cuda else 2
        while len(launched) > keep:
            s, rows, wait = launched.popleft()
            s.store_features(rows, wait(), after_chunk)
            s.maybe_log(opts.progress_every_s)

    while order:
        submit_more()
        current = order[0]
        ready_slide = next((s for s in order if s.n_ready >= opts.batch_size or (s.n_ready and s.all_returned)), None)
        if ready_slide is not None:
            rows, batch = ready_slide.take_batch(opts.batch_size)
            launched.append((ready_slide, rows, runner.launch(batch)))
            collect(block_all=False)
        elif inflight:
            res = pool.get()
            inflight -= 1
            s = by_index[res.job]
            if res.fatal:
                raise SlideError(f"slide {s.slide_id}: {res.fatal}")
            s.add_result(res)
        else:
            collect(block_all=True)
        # finalise slides in order once all their chunks are stored
        if current.all_returned and not current.n_ready and current.in_model:
            collect(block_all=True)
        while order and order[0].finished:
            s = order.popleft()
            s.maybe_log(0, force=True)
            _finalize(s.store, s.final, s.plan, opts)
        if not order:
            break
        if order[0].all_returned and not order[0].n_ready and not order[0].in_model and not order[0].finished:
            raise RuntimeError(f"slide {order[0].slide_id}: internal error, chunks {sorted(order[0].pending_chunks)} "
                               "never completed")
    collect(block_all=True)
    wall = time.perf_counter() - t0
    busy = runner.gpu_busy_seconds()
    log.info("model busy %.1f s of %.1f s wall (%.0f%%)", busy, wall, 100.0 * busy / max(wall, 1e-9))
    return {"wall_s": wall, "model_busy_s": busy, "patches": sum(s.total for s in states),
            "read_s": sum(s.read_seconds for s in states), "invalid": sum(len(s.errors) for s in states)}


def _store_attrs(plan: PatchPlan, job: SlideJob, encoder: PatchEncoder, identity: dict, opts: ExtractOptions) -> dict:
    ca = plan.coords_attrs
    return jsonable({
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "slide_id": plan.slide_id,
        "status": ca.get("status", "ok") if len(plan.coords) else "no_tissue",
        **identity,
        "checkpoint": str(encoder.checkpoint) if encoder.checkpoint else None,
        "store_format": opts.fmt,
        "target_mpp": ca.get("target_mpp"),
        "patch_size": plan.patch_size,
        "read_level": plan.read_level,
        "read_size": plan.read_size,
        "read_downsample_xy": list(plan.downsample_xy),
        "mpp_level0": ca.get("mpp_level0"),
        "patch_size_level0": ca.get("patch_size_level0"),
        "level0_magnification": ca.get("level0_magnification"),
        "target_magnification": ca.get("target_magnification"),
        "coords_file": str(Path(job.coords).resolve()),
        "coords_attrs": ca,
        "slide_path": str(Path(job.slide).resolve()),
        "mpp_override": job.mpp,
        "n_patches": int(len(plan.coords)),
        "software": software_versions(),
    })


def _open_partial(path: Path, plan: PatchPlan, dim: int, opts: ExtractOptions, attrs: dict,
                  identity: dict) -> PartialZarrStore:
    if path.exists():
        try:
            store = PartialZarrStore(path)
            existing = store.attrs
        except Exception as exc:  # a partial store killed before its metadata existed: nothing to keep
            log.warning("discarding unreadable partial store %s (%s)", path, exc)
            shutil.rmtree(path)
        else:
            diff = _identity_diff(existing, identity)
            if existing.get("chunk_rows") != opts.chunk_rows:
                diff.append(f"chunk_rows: store has {existing.get('chunk_rows')}, requested {opts.chunk_rows}")
            if not diff:
                log.info("slide %s: resuming, %d of %d chunks already done", plan.slide_id, len(store.done_chunks()),
                         store.n_chunks)
                return store
            if not opts.overwrite:
                raise StoreError(
                    f"partial store {path} was started with other parameters ({'; '.join(diff)}); refusing to mix. "
                    f"Delete it, use another output directory, or pass --overwrite"
                )
            shutil.rmtree(path)
    return PartialZarrStore.create(path, plan.coords, dim, opts.store_dtype, opts.chunk_rows, attrs)


def _finalize(store: PartialZarrStore, final: Path, plan: PatchPlan, opts: ExtractOptions) -> Path:
    valid = store.read_valid()
    # read errors of every chunk, including chunks written by an earlier, interrupted run
    errors = sorted((e for info in store.marker_infos().values() for e in info.get("errors", [])),
                    key=lambda e: e["index"])
    extra = {"n_valid": int(valid.sum()), "invalid": errors}
    if errors:
        log.warning("slide %s: %d of %d patches unreadable and marked invalid", plan.slide_id, len(errors), len(valid))
    if opts.fmt == "zarr":
        return store.finalize(final, extra)
    # H5: the partial Zarr store is converted (checked against its chunk checksums), then removed
    feats = store.read_checked()[0]
    attrs = {**{k: v for k, v in store.attrs.items() if k not in {"complete", "chunk_rows"}}, **extra}
    write_h5_store(final, feats, plan.coords, valid, attrs, plan.coords_attrs, opts.store_dtype)
    shutil.rmtree(store.path)
    return final


def extract_slide(
    slide_path: str | Path,
    coords_h5: str | Path,
    out_dir: str | Path,
    encoder: str = "conch_tiny",
    checkpoint: str | None = None,
    transform: str | None = None,
    fmt: str = "zarr",
    mpp: float | None = None,
    batch_size: int = 64,
    num_workers: int = 1,
    **kwargs: Any,
) -> Path:
    """Extract one slide's features into `out_dir/<slide_id>.zarr` (or `.h5`); returns the store path."""
    opts = ExtractOptions(encoder=encoder, checkpoint=checkpoint, transform=transform, fmt=fmt,
                          batch_size=batch_size, num_workers=num_workers,
                          **{k: v for k, v in kwargs.items() if not k.startswith("_")})
    hook = kwargs.get("_after_chunk")
    return extract_slides([SlideJob(Path(slide_path), Path(coords_h5), mpp)], out_dir, opts, _after_chunk=hook)[0]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> list[SlideJob]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"slide", "coords"} <= set(rows[0]):
        raise ValueError(f"{path}: manifest needs columns slide,coords[,mpp]")
    return [SlideJob(Path(r["slide"]), Path(r["coords"]), float(r["mpp"]) if r.get("mpp") else None) for r in rows]


def build_parser() -> argparse.ArgumentParser:
    ap = command_parser("python -m preprocessing extract",
                        "Patch features for tiled slides into per-slide stores (OUT/<slide_id>.zarr or .h5).",
                        "python -m preprocessing extract --slide S.svs --coords patches/S.h5 --out features/ "
                        "--checkpoint CONCH/pytorch_model.bin")
    ap.add_argument("--slide", action="append", default=[], help="slide file (repeat with --coords for several)")
    ap.add_argument("--coords", action="append", default=[], help="coords file DIR/<slide_id>.h5 from tiling")
    ap.add_argument("--slide-id", help="with one --slide: the id its coords file must record (a sample sheet's "
                                       "slide_id; the store is named after it)")
    ap.add_argument("--manifest", type=Path, help="CSV with columns slide,coords[,mpp] (instead of --slide/--coords)")
    ap.add_argument("--mpp", type=float, help="level-0 µm/px override for the --slide(s) (config key mpp_overrides)")
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    add_arguments(ap.add_argument_group("extraction (config section `features`)"), ExtractOptions)
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.manifest:
        if args.slide or args.coords or args.slide_id:
            print("error: give either --manifest or --slide/--coords[/--slide-id]", file=sys.stderr)
            return 2
        jobs = _read_manifest(args.manifest)
    else:
        if not args.slide or len(args.slide) != len(args.coords):
            print("error: give one --coords per --slide", file=sys.stderr)
            return 2
        if args.slide_id and len(args.slide) != 1:
            print("error: --slide-id names one slide; give one --slide with it", file=sys.stderr)
            return 2
        jobs = [SlideJob(Path(s), Path(c), args.mpp) for s, c in zip(args.slide, args.coords)]
    try:
        recorded = read_coords(jobs[0].coords).slide_id if args.slide_id else None
        if recorded != args.slide_id:
            raise StoreError(f"{jobs[0].coords} records slide {recorded!r}, not {args.slide_id!r} (option --slide-id); "
                             f"re-run tiling for this slide")
        paths = extract_slides(jobs, args.out, from_arguments(ExtractOptions, args))
    except (StoreError, SlideError, EncoderCheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0
