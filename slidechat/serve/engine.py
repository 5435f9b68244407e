"""The work behind the page: one model on one thread, and preprocessing jobs on another.

`ModelWorker` owns the model (loaded once). Every question goes through its single-thread queue, so two
users never run the model at the same time; the features and visual tokens of the last few slides stay
cached, so a slide is encoded once however many questions it gets. `Preprocessor` runs the cached stages
of `slidechat ask` (segmentation, tiling, feature extraction) for one slide at a time and keeps each
job's progress for the page to poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from slidechat.inference import FeatureSettings, prepare_slide
from slidechat.serve.attribution import patch_attribution
from slidechat.serve.slides import OutputFinder, SlideEntry
from wsicore.errors import InputError, UserError

log = logging.getLogger("slidechat.serve")


@dataclass
class Reply:
    """One answer and, per patch of the slide's feature store, how much it contributed (signed)."""

    answer: str
    heat: np.ndarray | None
    answer_seconds: float
    attribution_seconds: float


class ModelWorker:
    """The model behind a queue of one; slide encodings cached per feature store."""

    def __init__(self, model: Any, max_new_tokens: int = 500, attribution_steps: int = 16,
                 cached_slides: int = 4) -> None:
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.attribution_steps = attribution_steps  # 0: no heatmaps
        self.cached_slides = cached_slides
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slidechat-model")
        self._lock = threading.Lock()
        self._waiting = 0
        self._slides: OrderedDict[tuple[Path, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.encodings = 0  # slides encoded so far (the cache's misses)

    @property
    def waiting(self) -> int:
        """Questions queued or running."""
        with self._lock:
            return self._waiting

    def submit(self, func: Callable[..., Any], *args: Any) -> Future:
        """Run `func(*args)` on the model thread after everything queued before it."""
        with self._lock:
            self._waiting += 1

        def run() -> Any:
            try:
                return func(*args)
            finally:
                with self._lock:
                    self._waiting -= 1

        return self._executor.submit(run)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def slide(self, store: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, visual tokens) of a feature store; call on the model thread only."""
        from slidechat.evaluate import load_slide_tensor, model_device_dtype

        key = (store, store.stat().st_mtime_ns)
        if key in self._slides:
            self._slides.move_to_end(key)
            return self._slides[key]
        device, dtype = model_device_dtype(self.model)
        features = load_slide_tensor(store, device, dtype, self.model.config.feature_dim)
        if features.shape[0] == 0:
            raise InputError(f"{store}: holds no patches (a slide without tissue); nothing to ask about")
        with torch.inference_mode():
            visual = self.model.encode_slide(features)
        self.encodings += 1
        self._slides[key] = (features, visual)
        while len(self._slides) > self.cached_slides:
            self._slides.popitem(last=False)
        return features, visual

    def answer(self, store: Path, question: str, history: Sequence[tuple[str, str]] = ()) -> Reply:
        """Answer `question` about the slide of `store` (after `history`); call on the model thread only."""
        features, visual = self.slide(store)
        t0 = time.perf_counter()
        with torch.inference_mode():
            text = self.model.generate(None, question, visual_embeds=visual, history=list(history) or None,
                                       max_new_tokens=self.max_new_tokens, do_sample=False)
        t1 = time.perf_counter()
        heat = None
        if self.attribution_steps > 0 and text.strip():
            heat = patch_attribution(self.model, features, question, text, history, steps=self.attribution_steps)
        return Reply(text, heat, t1 - t0, time.perf_counter() - t1)


@dataclass
class Job:
    """A preprocessing job as the page sees it."""

    slide_id: str
    state: str = "queued"  # queued | running | done | failed
    step: str = ""  # segmenting | tiling | features
    done: int = 0  # patches extracted so far (features step)
    total: int = 0
    message: str = ""
    started: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ExtractProgress(logging.Handler):
    """Turns the extractor's progress lines ("slide %s: %d/%d patches, ...") into the running job's counts."""

    def __init__(self, job: Job) -> None:
        super().__init__(logging.INFO)
        self.job = job

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("slide %s: %d/%d patches") and isinstance(record.args, tuple):
            self.job.done, self.job.total = int(record.args[1]), int(record.args[2])


class Preprocessor:
    """Segmentation, tiling and feature extraction of slides, one at a time, as `slidechat ask` caches them."""

    def __init__(self, settings: FeatureSettings | None, finder: OutputFinder, disabled_reason: str = "") -> None:
        self.settings = settings
        self.finder = finder
        self.disabled_reason = disabled_reason if settings is None else ""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slidechat-preprocess")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def job(self, slide_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(slide_id)

    def start(self, entry: SlideEntry) -> Job:
        """Queue a job for the slide (the running or queued one when there is one already)."""
        if self.settings is None:
            raise RuntimeError(self.disabled_reason)
        with self._lock:
            job = self._jobs.get(entry.slide_id)
            if job is not None and job.state in ("queued", "running"):
                return job
            job = self._jobs[entry.slide_id] = Job(entry.slide_id)
        self._executor.submit(self._run, entry, job)
        return job

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, entry: SlideEntry, job: Job) -> None:
        job.state = "running"

        def on_log(line: str) -> None:
            job.message = line
            for step in ("segmenting", "tiling", "features"):
                if line.startswith(step):
                    job.step = step

        progress = _ExtractProgress(job)
        extract_log = logging.getLogger("preprocessing.extract")
        level = extract_log.level
        extract_log.setLevel(logging.INFO)  # its progress lines are INFO
        extract_log.addHandler(progress)
        try:
            store = prepare_slide(entry.path, self.settings, self.finder.cache_of(entry), mpp=entry.mpp, log=on_log)
            job.done = job.total = job.total or _n_rows(store)
            job.state, job.message = "done", f"features ready: {store.name}"
        except (UserError, FileNotFoundError) as exc:  # the slide's own problem (no pixel size, file gone)
            job.state, job.message = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - one slide's failure must not take the server down
            log.exception("preprocessing %s failed", entry.slide_id)
            job.state, job.message = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            extract_log.removeHandler(progress)
            extract_log.setLevel(level)


def _n_rows(store: Path) -> int:
    from preprocessing.stores import read_store_attrs

    return int(read_store_attrs(store).get("n_valid") or 0)
