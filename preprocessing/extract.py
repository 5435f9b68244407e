"""Batched patch-feature extraction: coords file + slide -> one feature store per slide.

Data path (built so the model never waits and nothing is copied twice):
- The main process plans, for each slide, *regions*: blocks of neighbouring patches read at once and cut
  into patches, instead of one read per patch.
- Readers (`preprocessing.readers`, torch-free; a long-lived process pool shared by all slides of a run, or
  the main process itself) read a region from the level's own compressed tiles where the slide allows it
  (`preprocessing.slide_tiles`: Aperio/generic tiled TIFF, JPEG or RGB JPEG 2000; OpenSlide's pixels, ~4x
  cheaper) and from OpenSlide otherwise, and cut and resize each patch straight into its place in a batch
  slot in shared memory (`BatchRing`). Region tasks of the next slide are queued while this slide's batches
  are on the model, so reads overlap compute across slide boundaries, and a batch may hold several slides.
- With `tile_decode="device"` (default on CUDA for JPEG tiles) readers only read compressed tiles and the
  main process decodes them on the GPU (nvJPEG) and cuts and resizes the patches there (`device_tiles`).
- The model stage converts and normalises uint8 batches on the device (`PatchEncoder.preprocess`) and runs
  under `torch.inference_mode`: bf16 autocast on CUDA, fp32 on CPU (bf16 on CPU only on request), channels_last
  and BatchNorm folded into convolutions for convolutional encoders. On CUDA batch slots are page-locked in place and each batch's result is copied
  back asynchronously while the next batch runs.
- A region that cannot be read (e.g. a corrupt JPEG tile) is re-read patch by patch on a fresh handle;
  patches that still fail are stored as invalid (`valid == False`) and reported, the rest is extracted.

Pixels (`preset`): by default a patch is the read-level pixel block nearest to its level-0 corner, resized
by area averaging; `preset="clam"` / `"trident"` read and resize exactly as those tools do (see readers).

Outputs are resumable: rows are written in chunks to a hidden partial store with a marker per finished
chunk; a killed run continues from the markers, the final store appears by an atomic rename, and a rerun
whose store already exists with the same parameters does nothing. A store (final or partial) made with
other parameters is never extended: that is an error telling the user what differs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from preprocessing.device_tiles import decode_crops
from preprocessing.encoders import TRANSFORMS, PatchEncoder, build_encoder
from preprocessing.readers import PIXEL_RULES, PatchRing, Reader, ReaderPool, RegionResult, RegionTask
from preprocessing.slide import SlideError, WholeSlide
from preprocessing.slide_tiles import TiledLevel
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
from wsicore.errors import ConfigError, InputError, UsageError
from wsicore.files import input_file, jsonable, output_folder
from wsicore.settings import add_arguments, from_arguments, setting

log = logging.getLogger("preprocessing.extract")

# Attributes that identify a store's content; a store whose values differ is never reused or extended.
IDENTITY_KEYS = (
    "encoder", "encoder_config", "feature_dim", "checkpoint_sha256", "seed", "transform", "transform_spec",
    "dtype", "precision", "coords_sha256", "preset",
)
# No tiling reads or feeds a patch side beyond this (1024 px at 5 µm/px from a 0.25 µm/px level is 20,480 px
# of level 0, read at a coarser level); a coords file claiming more is damaged, not a bigger patch.
MAX_PATCH_PX = 16_384
# A recorded read-level downsample may differ this much (relative) from the slide's exact one (rounding in
# CLAM's and older files); more means the coords describe another pyramid.
DOWNSAMPLE_TOLERANCE = 0.01
PRESETS = tuple(r for r in PIXEL_RULES if r != "nearest")  # "clam", "trident"
PRECISIONS = ("fp32", "bf16")
MEMORY_FORMATS = ("channels_last", "contiguous")
TILE_DECODES = ("auto", "reader", "device", "off")


@dataclass
class ExtractOptions:
    """Patch-feature extraction (config section `features`; flags of `python -m preprocessing extract`)."""

    # The real encoder by default: random weights are never what a run gets without asking for them.
    encoder: str = setting("conch_v1", help="patch encoder: conch_v1 | conch_tiny | resnet50_trunc | timm:<name>")
    checkpoint: str | None = setting(
        None, flag="--encoder-checkpoint", aliases=("--checkpoint",),
        help="local weights file of the encoder (CONCH's pytorch_model.bin); required for conch_v1")
    transform: str | None = setting(
        None, choices=sorted(TRANSFORMS),
        help="input transform; null = the encoder's own (conch_v1: conch_official, conch_tiny: slidechat)")
    fmt: str = setting("zarr", key="format", choices=["zarr", "h5"], help="feature store format")
    dtype: str | None = setting(
        None, choices=["float16", "float32"], help="stored feature dtype; null = float16 (zarr) or float32 (h5)")
    batch_size: int = setting(64, help="patches per forward pass", minimum=1)
    num_workers: int | None = setting(
        None, minimum=0,
        help="reader processes; 0 reads in the main process. null: 0 on CPU (the model uses every core and reading "
             "is ~2% of the time: a reader only takes a core from it), all cores but one on CUDA")
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
    preset: str | None = setting(
        None, choices=list(PRESETS),
        help="read and resize pixels exactly as `clam` (extract_features_fp: OpenSlide read at the corner, PIL "
             "bilinear) or `trident` (OpenSlide read, PIL bicubic) does; null: nearest read-level pixel, area "
             "resize. Part of the store's identity")
    precision: str | None = setting(
        None, choices=list(PRECISIONS),
        help="fp32 | bf16 autocast; null: bf16 on CUDA, fp32 on CPU (bf16 on CPU moves features ~0.3% and is "
             "recorded in the store's identity)")
    memory_format: str = setting(
        "auto", choices=["auto", *MEMORY_FORMATS],
        help="channels_last | contiguous | auto (channels_last for convolutional encoders: 1.6x less CPU, measured)")
    tile_decode: str = setting(
        "auto", choices=list(TILE_DECODES),
        help="where a slide's own JPEG tiles are decoded: reader (libjpeg-turbo in the readers), device (the "
             "model's device: nvJPEG on CUDA), off (always OpenSlide), auto (device on CUDA, reader on CPU)")
    threads: int | None = setting(None, minimum=1, help="torch CPU threads of the model; null: torch's default")

    def __post_init__(self) -> None:
        if self.fmt not in {"zarr", "h5"}:
            raise ConfigError(f"format must be 'zarr' or 'h5', got {self.fmt!r} (option --format)")
        if self.batch_size < 1 or self.chunk_rows < 1 or self.region_px < 1 or (self.num_workers or 0) < 0:
            raise ConfigError("batch_size, chunk_rows and region_px must be >= 1 and num_workers >= 0")
        if self.preset not in (None, *PRESETS):
            raise ConfigError(f"preset must be one of {PRESETS}, got {self.preset!r} (option --preset)")
        if self.precision not in (None, *PRECISIONS):
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r} (option --precision)")
        if self.memory_format not in ("auto", *MEMORY_FORMATS):
            raise ConfigError(f"memory_format must be auto or one of {MEMORY_FORMATS}, got {self.memory_format!r} "
                              "(option --memory-format)")
        if self.tile_decode not in TILE_DECODES:
            raise ConfigError(f"tile_decode must be one of {TILE_DECODES}, got {self.tile_decode!r} "
                              "(option --tile-decode)")

    @property
    def store_dtype(self) -> str:
        return self.dtype or ("float16" if self.fmt == "zarr" else "float32")

    @property
    def pixels(self) -> str:
        return self.preset or "nearest"


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

    path = input_file(path, "coords file", "--coords")
    coords, attrs = load_coords(path)

    def number(keys: tuple[str, ...], kind: type, default: Any = None) -> Any:
        key = next((k for k in keys if k in attrs), None)
        if key is None and default is None:
            raise StoreError(f"{path}: coords attribute {keys[0]} is missing; re-run tiling")
        value = attrs[key] if key is not None else default
        try:
            values = [kind(v) for v in np.ravel(value)]
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError(value)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{path}: coords attribute {key} is {value!r}, not a number; re-run tiling") from exc
        return values

    level = number(("read_level", "patch_level"), int)[0]
    patch_size = number(("patch_size",), int)[0]
    read_size = number(("read_size",), int, patch_size)[0]
    ds = number(("read_downsample_xy", "downsample"), float, (1.0, 1.0))
    ds_xy = (ds[0], ds[-1])
    for name, value in (("patch_size", patch_size), ("read_size", read_size)):
        if not 1 <= value <= MAX_PATCH_PX:
            raise StoreError(f"{path}: coords attribute {name} is {value}; a patch side must be 1 to {MAX_PATCH_PX} "
                             f"px. Re-run tiling")
    if level < 0 or not all(d > 0 for d in ds_xy):
        raise StoreError(f"{path}: coords attributes read level {level}, downsample {ds_xy} are not a pyramid level "
                         f"(level >= 0, downsample > 0); re-run tiling")
    slide_id = str(attrs.get("slide_id") or path.stem)
    if Path(slide_id).name != slide_id or slide_id in (".", ".."):  # the store is named after it
        raise StoreError(f"{path}: records slide_id {slide_id!r}, which is not a file name; a store named after it "
                         "would be written outside the output folder. Re-run tiling for this slide")
    return PatchPlan(slide_id, coords, jsonable(attrs), level, read_size, patch_size, ds_xy)


def check_plan_fits_slide(plan: PatchPlan, ws: WholeSlide, coords_path: str | Path) -> None:
    """Refuse a plan the slide cannot serve: a read level it lacks, a downsample that is not that level's, or
    patch corners outside level 0 (they would be read as background and give features of nothing)."""
    if plan.read_level >= ws.level_count:
        raise StoreError(f"{coords_path}: records read level {plan.read_level}, but slide {ws.slide_id} ({ws.path}) "
                         f"has levels 0-{ws.level_count - 1}; pass the slide the coords were made from, or re-run tiling")
    exact = ws.level_downsample_xy(plan.read_level)
    if any(abs(r - e) > DOWNSAMPLE_TOLERANCE * e for r, e in zip(plan.downsample_xy, exact)):
        raise StoreError(f"{coords_path}: records downsample {plan.downsample_xy[0]:.4g} x {plan.downsample_xy[1]:.4g} "
                         f"for read level {plan.read_level}, but that level of slide {ws.slide_id} has "
                         f"{exact[0]:.4g} x {exact[1]:.4g}; re-run tiling for this slide")
    w0, h0 = ws.dimensions
    xy = plan.coords
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w0) | (xy[:, 1] >= h0)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise StoreError(f"{coords_path}: {int(outside.sum())} of {len(xy)} patch corners lie outside slide "
                         f"{ws.slide_id} ({w0} x {h0} px at level 0), the first ({int(xy[i, 0])}, {int(xy[i, 1])}) "
                         f"at row {i}; pass the slide the coords were made from, or re-run tiling")


def check_mpp_override(plan: PatchPlan, job: SlideJob) -> None:
    """An --mpp that differs from the level-0 µm/px the coords were tiled at cannot be honoured (the coords fix
    where and how large each patch is); refuse it rather than record it beside the coords' own value."""
    recorded = plan.coords_attrs.get("mpp_level0_xy", plan.coords_attrs.get("mpp_level0"))
    if job.mpp is None or recorded is None:
        return
    try:
        values = [float(v) for v in np.ravel(recorded)]
    except (TypeError, ValueError):
        return
    if values and all(math.isfinite(v) and v > 0 for v in values) and \
            any(abs(job.mpp - v) > 1e-3 * v for v in values):
        raise ConfigError(
            f"--mpp {job.mpp:g} for slide {plan.slide_id}, but {job.coords} was tiled at {values[0]:g} µm/px at level 0; "
            f"the coords fix the patch geometry, so re-run tiling with --mpp {job.mpp:g}, or leave --mpp out",
            config_hint="tiling and extraction take the slide's µm/px from the same `mpp_overrides:` entry")


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
# Batch slots: where readers (or the device decoder) put patches and the model takes them
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Slot:
    """One batch's worth of places in a ring, filled by several region tasks, read by the model at once."""

    index: int
    capacity: int
    allocated: int = 0
    filled: int = 0
    members: list[tuple["SlideState", np.ndarray, np.ndarray]] = field(default_factory=list)  # state, rows, places
    release: Any = None  # CUDA event after which readers may overwrite the slot (host ring on CUDA)

    @property
    def ready(self) -> bool:
        return self.allocated > 0 and self.filled == self.allocated


class BatchRing:
    """Batch slots of one patch size, in shared memory that readers write (`host`) or on the model's device
    (`device`, filled by `device_tiles.decode_crops`). Places are handed out in order, so a batch is the next
    `batch_size` patches in plan order (across slides); a batch starts on the model as soon as its reads are in.
    """

    def __init__(self, kind: str, slots: int, batch: int, patch_size: int, device: torch.device) -> None:
        self.kind, self.batch, self.patch_size = kind, batch, patch_size
        self.host: PatchRing | None = None
        self._registered = False
        if kind == "host":
            self.host = PatchRing(slots, batch, patch_size)
            self.tensor = torch.from_numpy(self.host.array)  # no copy: the same shared memory
            if device.type == "cuda":
                # Page-lock the shared memory itself, so batches go to the GPU by DMA without a staging copy.
                err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.host.shm.size, 0)
                self._registered = int(err) == 0
        else:
            self.tensor = torch.empty((slots, batch, patch_size, patch_size, 3), dtype=torch.uint8, device=device)
        self.slots = [Slot(i, batch) for i in range(slots)]
        self.free: deque[Slot] = deque(self.slots)
        self.filling: Slot | None = None

    @property
    def handle(self) -> tuple[str, tuple[int, ...]] | None:
        return (self.host.name, self.host.shape) if self.host is not None else None

    def room(self) -> int:
        return (self.filling.capacity - self.filling.allocated if self.filling else 0) + len(self.free) * self.batch

    def allocate(self, state: "SlideState", rows: np.ndarray) -> np.ndarray:
        """(slot, index) places for `rows`, spilling into the next free slot; the caller checked `room()`."""
        places = np.empty((len(rows), 2), np.int64)
        done = 0
        while done < len(rows):
            if self.filling is None or self.filling.allocated == self.filling.capacity:
                self.filling = self.free.popleft()
            slot = self.filling
            take = min(len(rows) - done, slot.capacity - slot.allocated)
            idx = np.arange(slot.allocated, slot.allocated + take)
            places[done : done + take, 0] = slot.index
            places[done : done + take, 1] = idx
            slot.members.append((state, rows[done : done + take], idx))
            slot.allocated += take
            done += take
        return places

    def close_filling(self) -> None:
        """No more patches will come: the partly filled slot becomes a (short) batch."""
        if self.filling is not None and self.filling.allocated:
            self.filling.capacity = self.filling.allocated
        self.filling = None

    def take_ready(self) -> Slot | None:
        """A slot whose places are all handed out and all filled (the caller runs the model on it)."""
        for slot in self.slots:
            if slot.ready and slot.allocated == slot.capacity and slot.release is None:
                if slot is self.filling:
                    self.filling = None
                return slot
        return None

    def recycle(self, slot: Slot, release: Any = None) -> None:
        """The model has the slot's patches: reuse it now, or once `release` (a CUDA event) has passed."""
        if release is not None:
            slot.release = release
            return
        slot.capacity, slot.allocated, slot.filled, slot.members = self.batch, 0, 0, []
        self.free.append(slot)

    def reclaim(self, block: bool = False) -> None:
        """Return host slots whose copy to the GPU has finished."""
        for slot in self.slots:
            if slot.release is not None and (block or slot.release.query()):
                slot.release.synchronize()
                slot.release = None
                self.recycle(slot)

    def close(self) -> None:
        if self.host is not None:
            if self._registered:
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            del self.tensor
            self.host.close()


# --------------------------------------------------------------------------------------------------
# Model stage
# --------------------------------------------------------------------------------------------------
def channels_last_pays(model: nn.Module) -> bool:
    """Convolutions beyond a patch embedding: measured 1.6x less CPU in channels_last (ResNet-50 trunc,
    features equal to 1e-7); a ViT's only convolution is its stride == kernel patch embedding."""
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """A copy of `model` with every BatchNorm that directly follows a convolution folded into its weights
    (inference only; measured 1.35x less CPU for ResNet-50 trunc, features equal to 1e-7), or None when
    there is nothing to fold or the folded copy does not compute the same features on `example`."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return None
    folded = copy.deepcopy(model)
    n = 0
    for parent in folded.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):  # conv then its BatchNorm, as registered (timm/torchvision order)
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                parent._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
                n += 1
    if n == 0:
        return None
    with torch.inference_mode():
        want, got = model(example), folded(example)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):  # a BatchNorm registered after a conv it does not follow
        return None
    return folded


class ModelRunner:
    """Runs the encoder on uint8 batches; on CUDA the copy back overlaps the next batch."""

    def __init__(self, encoder: PatchEncoder, precision: str | None = None, memory_format: str = "auto") -> None:
        self.encoder = encoder
        self.device = encoder.device
        self.cuda = self.device.type == "cuda"
        self.precision = precision or ("bf16" if self.cuda else "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r} (option --precision)")
        if memory_format == "auto":
            memory_format = "channels_last" if channels_last_pays(encoder.model) else "contiguous"
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory format must be auto or one of {MEMORY_FORMATS}, got {memory_format!r}")
        self.memory_format = memory_format
        self._format = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        size = encoder.transform.size
        example = torch.rand(2, 3, size, size, device=self.device)
        folded = fold_batchnorm(encoder.model.eval(), example)
        self.folded_batchnorm = folded is not None
        self.model = (folded or encoder.model).to(memory_format=self._format)
        self.busy_seconds = 0.0  # time spent inside the model stage (CPU) / GPU event time (CUDA)
        self._events: list[tuple[Any, Any]] = []
        self._input: torch.Tensor | None = None  # reused model input (fresh 40 MB buffers cost page faults on CPU)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        size = self.encoder.transform.size
        shape = (batch.shape[0], 3, size, size)
        if self._input is None or self._input.shape != shape:
            self._input = torch.empty(shape, device=self.device).contiguous(memory_format=self._format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            x = self.encoder.preprocessor(batch, out=self._input)
            return self.model(x.contiguous(memory_format=self._format))

    def launch(self, batch: torch.Tensor) -> tuple[Callable[[], np.ndarray], Any]:
        """Start the model on uint8 `batch`; returns (wait for features (B, D) fp32, event after which the
        input memory may be reused: None when it already may)."""
        t0 = time.perf_counter()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.inference_mode():
                x = batch.to(self.device, non_blocking=True)
                consumed = torch.cuda.Event()
                consumed.record()
                feats = self._features(x)
            host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(feats.float(), non_blocking=True)
            end.record()
            self._events.append((start, end))

            def wait() -> np.ndarray:
                end.synchronize()
                return host.numpy()

            return wait, (consumed if batch.device.type == "cpu" else None)
        with torch.inference_mode():
            out = self._features(batch).float().numpy()
        self.busy_seconds += time.perf_counter() - t0
        return (lambda: out), None

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
    """Bookkeeping for one slide in flight: region tasks to submit, chunk buffers, errors, progress."""

    def __init__(self, index: int, job: SlideJob, plan: PatchPlan, store: PartialZarrStore, final: Path,
                 opts: ExtractOptions, feature_dim: int, tiles: TiledLevel | None, tile_decode: str) -> None:
        self.index, self.job, self.plan, self.store, self.final = index, job, plan, store, final
        self.slide_id = plan.slide_id
        done = store.done_chunks()
        self.pending_chunks = set(range(store.n_chunks)) - done
        rows = np.concatenate([np.arange(*store.chunk_rows_of(i)) for i in sorted(self.pending_chunks)]) \
            if self.pending_chunks else np.zeros(0, np.int64)
        self.regions: deque[np.ndarray] = deque(
            plan_regions(plan.coords, rows, plan.downsample_xy, plan.read_size, opts.region_px))
        self.pixels = opts.pixels
        self.tiles = tiles
        self.tile_decode = tile_decode
        self.chunk_feats: dict[int, np.ndarray] = {}
        self.chunk_valid: dict[int, np.ndarray] = {}
        self.chunk_left: dict[int, int] = {}
        for i in self.pending_chunks:
            a, b = store.chunk_rows_of(i)
            self.chunk_feats[i] = np.zeros((b - a, feature_dim), np.float32)
            self.chunk_valid[i] = np.ones(b - a, bool)
            self.chunk_left[i] = b - a
        self.errors: list[dict] = []
        self.invalid: set[int] = set()
        self.total = len(rows)
        self.done_patches = 0
        self.t_start = time.perf_counter()
        self.t_log = self.t_start
        self.read_seconds = 0.0
        self.read_cpu_seconds = 0.0
        self.sources: dict[str, int] = {}

    @property
    def finished(self) -> bool:
        return not self.pending_chunks

    def task(self, rows: np.ndarray, ring: BatchRing, places: np.ndarray, tiles: str) -> RegionTask:
        p = self.plan
        return RegionTask(self.index, str(self.job.slide), self.job.mpp, p.read_level, p.read_size, p.patch_size,
                          p.downsample_xy, rows, p.coords[rows], ring.handle, places, self.pixels, tiles)

    def device_decodes(self, rows: np.ndarray) -> bool:
        """Whether this region's JPEG tiles go to the model's device undecoded (`tile_decode == "device"`)."""
        if self.tile_decode != "device" or self.tiles is None or self.tiles.codec != "jpeg" or self.pixels != "nearest":
            return False
        p = self.plan
        if p.read_size < p.patch_size:  # enlarging is bicubic in the readers; the device shrinks only
            return False
        gx = np.round(p.coords[rows, 0] / p.downsample_xy[0]).astype(np.int64)
        gy = np.round(p.coords[rows, 1] / p.downsample_xy[1]).astype(np.int64)
        x0, y0 = int(gx.min()), int(gy.min())
        return self.tiles.contains(x0, y0, int(gx.max()) - x0 + p.read_size, int(gy.max()) - y0 + p.read_size)

    def add_result(self, res: RegionResult) -> None:
        self.read_seconds += res.read_s
        self.read_cpu_seconds += res.cpu_s
        self.sources[res.source] = self.sources.get(res.source, 0) + len(res.rows)
        for pos, msg in res.errors.items():
            r = int(res.rows[pos])
            x, y = (int(v) for v in self.plan.coords[r])
            self.errors.append({"index": r, "x": x, "y": y, "error": msg})
            self.invalid.add(r)
            log.warning("slide %s: patch %d at (%d, %d) unreadable, marked invalid: %s", self.slide_id, r, x, y, msg)

    def store_features(self, rows: np.ndarray, feats: np.ndarray, after_chunk: Callable[[str, int], None] | None) -> None:
        chunk_rows = self.store.chunk_rows
        for chunk in np.unique(rows // chunk_rows):
            sel = rows // chunk_rows == chunk
            local = rows[sel] - chunk * chunk_rows
            i = int(chunk)
            self.chunk_feats[i][local] = feats[sel]
            self.chunk_valid[i][local] = [int(r) not in self.invalid for r in rows[sel]]
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
    called after each chunk is on disk. `stats`, if given, is filled with wall/model-busy/CPU seconds, counts
    and the settings chosen for this device (also recorded in each store as `extraction_settings`).
    """
    from preprocessing.tiling import check_coords_slide

    opts = options or ExtractOptions(**kwargs)
    if options is not None and kwargs:
        raise TypeError("pass either options or keyword settings, not both")
    out_dir = output_folder(out_dir, "--out")
    slide_jobs = [j if isinstance(j, SlideJob) else SlideJob(Path(j[0]), Path(j[1]), j[2] if len(j) > 2 else None)
                  for j in jobs]
    if encoder is None:
        device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder = build_encoder(opts.encoder, opts.checkpoint, opts.transform, device=device, seed=opts.seed,
                                allow_random=opts.allow_random)
    runner = ModelRunner(encoder, opts.precision, opts.memory_format)
    settings = device_settings(opts, runner)
    identity_base = {**encoder.describe(), "dtype": opts.store_dtype, "precision": runner.precision,
                     "preset": opts.preset}

    outputs: list[Path] = []
    states: list[SlideState] = []
    for idx, job in enumerate(slide_jobs):
        plan = read_coords(job.coords)
        with WholeSlide(job.slide) as ws:  # coords of another slide would name a store after it
            check_coords_slide(plan.coords_attrs, ws, job.coords)
            check_plan_fits_slide(plan, ws, job.coords)
        check_mpp_override(plan, job)
        if opts.preset == "trident":
            plan = with_trident_geometry(plan, job)
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
        attrs = _store_attrs(plan, job, encoder, identity, opts, settings)
        store = _open_partial(_partial_path(final), plan, encoder.feature_dim, opts, attrs, identity)
        if len(plan.coords) == 0:
            _finalize(store, final, plan, opts)
            continue
        tiles = _tiled_level(job, plan) if settings["tile_decode"] == "device" else None
        states.append(SlideState(idx, job, plan, store, final, opts, encoder.feature_dim, tiles, settings["tile_decode"]))

    if states:
        log.info("extracting %d slide(s), %d patches, encoder %s (%s), %s, %s, %d reader(s), batch %d, tiles %s, "
                 "pixels %s", len(states), sum(s.total for s in states), encoder.name, encoder.transform.name,
                 runner.precision, runner.memory_format, settings["num_workers"], opts.batch_size,
                 settings["tile_decode"], opts.pixels)
        with ReaderPool(settings["num_workers"]) as pool:
            run_stats = _run(states, pool, runner, opts, settings, _after_chunk)
        if stats is not None:
            stats.update(run_stats, settings=settings)
    return outputs


def device_settings(opts: ExtractOptions, runner: ModelRunner) -> dict:
    """Readers, threads, memory format and tile decoding for this device (recorded in stats and stores).

    CPU: the model uses every core and reading is a few % of the time, so readers only take cores from it
    (measured: `benchmarks/bench_extract.py`); reads run in the main process. CUDA: every core but one reads.
    """
    if opts.threads and not runner.cuda:
        torch.set_num_threads(opts.threads)
    workers = opts.num_workers
    if workers is None:
        workers = max(1, (os.cpu_count() or 2) - 1) if runner.cuda else 0
    decode = opts.tile_decode if opts.tile_decode != "auto" else ("device" if runner.cuda else "reader")
    return {"device": str(runner.device), "num_workers": workers, "threads": torch.get_num_threads(),
            "memory_format": runner.memory_format, "folded_batchnorm": runner.folded_batchnorm,
            "tile_decode": decode, "batch_size": opts.batch_size, "precision": runner.precision}


def with_trident_geometry(plan: PatchPlan, job: SlideJob) -> PatchPlan:
    """The read level and size TRIDENT's patcher derives from these coords (`WSIPatcher._prepare`).

    TRIDENT reads `level0_magnification`, `target_magnification` and `patch_size`, picks the level whose
    OpenSlide downsample is within 0.1 of the wanted one (else the closest finer level) and reads
    round(patch_size_level0 / int(level downsample)) pixels there. Usually this is our tiling's geometry.
    """
    import openslide

    attrs = plan.coords_attrs
    src, dst = attrs.get("level0_magnification"), attrs.get("target_magnification")
    if not src or not dst:
        raise StoreError(f"{job.coords}: preset trident needs the coords attributes level0_magnification and "
                         f"target_magnification (TRIDENT reads its geometry from them); re-run tiling")
    downsample = (10 / float(dst)) / (10 / float(src))
    size0 = round(plan.patch_size * downsample)
    try:
        with openslide.OpenSlide(str(job.slide)) as osr:
            ds = list(osr.level_downsamples)
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(f"slide {plan.slide_id}: OpenSlide cannot open {job.slide}: {exc}") from exc
    level = next((lv for lv, d in enumerate(ds) if abs(d - downsample) <= 0.1), None)
    if level is None:
        finer = [lv for lv, d in enumerate(ds) if d <= downsample]
        level = finer[-1] if downsample >= ds[0] and finer else next(lv for lv, d in enumerate(ds) if d >= downsample)
    read_size = round(size0 / int(ds[level]))
    if (level, read_size) == (plan.read_level, plan.read_size):
        return plan
    log.warning("slide %s: TRIDENT reads these coords at level %d, %d px (the coords file says level %d, %d px); "
                "preset trident reads as TRIDENT does", plan.slide_id, level, read_size, plan.read_level, plan.read_size)
    with WholeSlide(job.slide, mpp_override=job.mpp) as ws:
        ds_xy = ws.level_downsample_xy(level)
    return dataclasses.replace(plan, read_level=level, read_size=read_size, downsample_xy=ds_xy)


def _tiled_level(job: SlideJob, plan: PatchPlan) -> TiledLevel | None:
    with WholeSlide(job.slide, mpp_override=job.mpp) as ws:
        return TiledLevel.open(str(job.slide), plan.read_level, ws.level_dimensions[plan.read_level], ws.vendor)


def _run(states: list[SlideState], pool: ReaderPool, runner: ModelRunner, opts: ExtractOptions, settings: dict,
         after_chunk: Callable[[str, int], None] | None) -> dict:
    by_index = {s.index: s for s in states}
    to_submit = deque(states)  # slides with regions left to submit, in order
    unfinished = list(states)
    max_inflight = max(1, settings["num_workers"]) * opts.prefetch
    max_task = max((len(r) for s in states for r in s.regions), default=1)
    rings: dict[tuple[str, int], BatchRing] = {}
    inflight: dict[tuple[int, int], tuple[RegionTask, BatchRing]] = {}
    launched: deque[tuple[list, Callable[[], np.ndarray]]] = deque()
    fallback = Reader()  # re-reads, in this process, regions whose tiles the device could not decode
    t0, c0 = time.perf_counter(), time.process_time()
    decode_s = 0.0

    def ring_for(kind: str, patch_size: int) -> BatchRing:
        key = (kind, patch_size)
        if key not in rings:
            slots = 3 + math.ceil(max(1, settings["num_workers"]) * 2 * max_task / opts.batch_size)
            rings[key] = BatchRing(kind, slots, opts.batch_size, patch_size, runner.device)
        return rings[key]

    def submit_more() -> None:
        while len(inflight) < max_inflight and to_submit:
            s = to_submit[0]
            if not s.regions:
                to_submit.popleft()
                continue
            rows = s.regions[0]
            on_device = s.device_decodes(rows)
            ring = ring_for("device" if on_device else "host", s.plan.patch_size)
            if ring.room() < len(rows):
                return  # wait until the model frees a slot
            s.regions.popleft()
            places = ring.allocate(s, rows)
            mode = "bytes" if on_device else ("off" if settings["tile_decode"] == "off" else "decode")
            task = s.task(rows, ring, places, mode)
            inflight[(s.index, int(rows[0]))] = (task, ring)
            pool.submit(task)
        if not to_submit:
            for ring in rings.values():
                ring.close_filling()

    def place(res: RegionResult) -> None:
        nonlocal decode_s
        task, ring = inflight.pop((res.job, int(res.rows[0])))
        s = by_index[res.job]
        if res.fatal:
            raise SlideError(f"slide {s.slide_id}: {res.fatal}")
        patches = None
        if res.crops is not None:
            t = time.perf_counter()
            try:
                patches = decode_crops(res.crops, task.patch_size, runner.device)
            except RuntimeError as exc:  # a damaged tile: read this region again the OpenSlide way
                log.warning("slide %s: device could not decode a region's tiles (%s); re-reading it", s.slide_id, exc)
                res = fallback.read(dataclasses.replace(task, ring=None, tiles="off"))
            decode_s += time.perf_counter() - t
        if patches is None and res.pixels is not None:
            patches = torch.from_numpy(res.pixels)
        s.add_result(res)
        if patches is not None:
            dest = torch.as_tensor(res.dest, device=ring.tensor.device)
            ring.tensor[dest[:, 0], dest[:, 1]] = patches.to(ring.tensor.device)
        for slot_index, count in zip(*np.unique(res.dest[:, 0], return_counts=True)):
            ring.slots[int(slot_index)].filled += int(count)

    def collect(block_all: bool) -> None:
        # Store finished batches; on CUDA keep two in flight so the GPU always has queued work while the
        # main process places the next patches and writes results.
        keep = 0 if block_all or not runner.cuda else 2
        while len(launched) > keep:
            members, wait = launched.popleft()
            feats = wait()
            for state, rows, idx in members:
                state.store_features(rows, feats[idx], after_chunk)
                state.maybe_log(opts.progress_every_s)

    try:
        while unfinished:
            for ring in rings.values():
                ring.reclaim()
            submit_more()
            ready = next(((r, slot) for r in rings.values() if (slot := r.take_ready()) is not None), None)
            if ready is not None:
                ring, slot = ready
                wait, release = runner.launch(ring.tensor[slot.index, : slot.capacity])
                launched.append((slot.members, wait))
                ring.recycle(slot, release if ring.kind == "host" else None)
                collect(block_all=False)
            elif inflight:
                place(pool.get())
            elif launched:
                collect(block_all=True)
            elif any(slot.release is not None for r in rings.values() for slot in r.slots):
                for ring in rings.values():
                    ring.reclaim(block=True)
            else:
                stuck = [s.slide_id for s in unfinished]
                raise RuntimeError(f"internal error: slides {stuck} have chunks that never completed")
            for s in [s for s in unfinished if s.finished]:
                unfinished.remove(s)
                s.maybe_log(0, force=True)
                _finalize(s.store, s.final, s.plan, opts)
        collect(block_all=True)
    finally:
        for ring in rings.values():
            ring.reclaim(block=True)
            ring.close()
        fallback.close()
    wall = time.perf_counter() - t0
    main_cpu = time.process_time() - c0
    busy = runner.gpu_busy_seconds()
    patches = sum(s.total for s in states)
    read_cpu = sum(s.read_cpu_seconds for s in states)
    cpu = main_cpu + (read_cpu if settings["num_workers"] > 0 else 0.0)  # in-process reads are in main_cpu
    sources: dict[str, int] = {}
    for s in states:
        for k, v in s.sources.items():
            sources[k] = sources.get(k, 0) + v
    log.info("model busy %.1f s of %.1f s wall (%.0f%%), %.2f ms CPU per patch (%.2f reading)", busy, wall,
             100.0 * busy / max(wall, 1e-9), 1000 * cpu / max(patches, 1), 1000 * read_cpu / max(patches, 1))
    return {"wall_s": wall, "model_busy_s": busy, "patches": patches, "read_s": sum(s.read_seconds for s in states),
            "read_cpu_s": read_cpu, "main_cpu_s": main_cpu, "cpu_s": cpu, "device_decode_s": decode_s,
            "invalid": sum(len(s.errors) for s in states), "sources": sources}


def _store_attrs(plan: PatchPlan, job: SlideJob, encoder: PatchEncoder, identity: dict, opts: ExtractOptions,
                 settings: dict) -> dict:
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
        "extraction_settings": settings,
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
    num_workers: int | None = None,
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
    with open(input_file(path, "manifest CSV", "--manifest"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"slide", "coords"} <= set(rows[0]):
        raise InputError(f"{path}: a manifest needs columns slide,coords[,mpp] and a row per slide (option --manifest)")
    try:
        return [SlideJob(Path(r["slide"]), Path(r["coords"]), float(r["mpp"]) if r.get("mpp") else None)
                for r in rows]
    except ValueError as exc:
        raise InputError(f"{path}: an mpp value is not a number ({exc}) (option --manifest)") from exc


def build_parser() -> argparse.ArgumentParser:
    ap = command_parser("python -m preprocessing extract",
                        "Patch features for tiled slides into per-slide stores (OUT/<slide_id>.zarr or .h5).",
                        "python -m preprocessing extract --slide S.svs --coords patches/S.h5 --out features/ "
                        "--encoder-checkpoint CONCH/pytorch_model.bin")
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
            raise UsageError("give either --manifest or --slide/--coords[/--slide-id]")
        jobs = _read_manifest(args.manifest)
    else:
        if not args.slide or len(args.slide) != len(args.coords):
            raise UsageError("give one --coords per --slide (or a --manifest)")
        if args.slide_id and len(args.slide) != 1:
            raise UsageError("--slide-id names one slide; give one --slide with it")
        jobs = [SlideJob(Path(s), Path(c), args.mpp) for s, c in zip(args.slide, args.coords)]
        for job in jobs:  # a wrong path is said before the (slow) encoder is built
            input_file(job.slide, "slide", "--slide")
            input_file(job.coords, "coords file", "--coords")
    recorded = read_coords(jobs[0].coords).slide_id if args.slide_id else None
    if recorded != args.slide_id:
        raise StoreError(f"{jobs[0].coords} records slide {recorded!r}, not {args.slide_id!r} (option --slide-id); "
                         f"re-run tiling for this slide")
    paths = extract_slides(jobs, args.out, from_arguments(ExtractOptions, args))
    for p in paths:
        print(p)
    return 0
