"""`slidechat serve`: look at a slide while asking about it, and see where the answer came from.

    slidechat serve --model results/models/stage2 --slides results/demo/slides/labels.csv --results results

One process: the model is loaded once, FastAPI serves the page, the deep-zoom tiles (OpenSlide's DeepZoom
generator), the overlays (tissue contours and holes from the segmentation GeoJSON, kept patches from the
feature store) and the chat. Each answer comes with a per-patch heatmap (integrated gradients on the patch
features from the slide's average patch, see `slidechat.serve.attribution`). Questions queue for the one
model thread; slides not preprocessed yet can be started from the page (the cached stages of `slidechat
ask`). Binds 127.0.0.1 unless told otherwise; the page loads nothing from the internet (OpenSeadragon is
vendored).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from slidechat.inference import DEFAULT_CACHE, FeatureSettings, model_feature_config
from slidechat.serve.attribution import display_heat
from slidechat.serve.engine import ModelWorker, Preprocessor
from slidechat.serve.slides import OutputFinder, SlideEntry, SlideOutputs, read_slide_table
from wsicore.cli import command_parser
from wsicore.errors import InputError, UsageError, UserError

log = logging.getLogger("slidechat.serve")

STATIC_DIR = Path(__file__).parent / "static"
TILE_SIZE = 254
TILE_OVERLAP = 1
TILE_QUALITY = 80
MAX_QUESTION_CHARS = 4000
MAX_HISTORY_TURNS = 32
TOP_PATCHES = 5


@dataclass
class ServeState:
    """Everything a request may touch: the slide table, where outputs are, the model and the preprocessor."""

    slides: dict[str, SlideEntry]
    finder: OutputFinder
    worker: ModelWorker
    preprocessor: Preprocessor
    model_name: str


class ChatRequest(BaseModel):
    """A question and the conversation so far ([question, answer] pairs), as the page sends them."""

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    history: list[tuple[str, str]] = Field(default_factory=list, max_length=MAX_HISTORY_TURNS)


class _OpenSlides:
    """DeepZoom generators of recently viewed slides (OpenSlide handles are thread-safe for reading)."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def deepzoom(self, entry: SlideEntry) -> Any:
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        with self._lock:
            if entry.slide_id in self._open:
                self._open.move_to_end(entry.slide_id)
                return self._open[entry.slide_id]
        try:
            slide = openslide.open_slide(str(entry.path))
        except (OSError, openslide.OpenSlideError) as exc:
            raise InputError(f"slide {entry.slide_id}: cannot open {entry.path} ({exc})") from exc
        # limit_bounds=False: image coordinates are level-0 pixels, those of the GeoJSON and the patch coords
        dz = DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=TILE_OVERLAP, limit_bounds=False)
        with self._lock:
            self._open[entry.slide_id] = dz
            while len(self._open) > self.keep:
                self._open.popitem(last=False)  # closed when the last request using it is done
        return dz


def patch_grid(outputs: SlideOutputs) -> dict[str, Any] | None:
    """Kept patches: level-0 top-left coords and size, from the feature store (the rows the model sees)
    or, before extraction, from the coords file."""
    from preprocessing.stores import load_features
    from preprocessing.tiling import load_coords

    if outputs.store is not None:
        fs = load_features(outputs.store)
        attrs = fs.attrs.get("coords_attrs") or {}
        size = attrs.get("patch_size_level0_xy") or [fs.attrs.get("patch_size_level0")] * 2
        return {"source": "features", "coords": fs.coords.tolist(), "size": [float(s) for s in size]}
    if outputs.coords is not None:
        coords, attrs = load_coords(outputs.coords)
        size = np.asarray(attrs.get("patch_size_level0_xy", [attrs.get("patch_size_level0")] * 2), float)
        return {"source": "tiles", "coords": coords.tolist(), "size": size.tolist()}
    return None


def create_app(state: ServeState) -> Any:
    """The FastAPI application over `state`."""
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="slidechat serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    slides = _OpenSlides()

    def entry_of(slide_id: str) -> SlideEntry:
        # the only way from a request to a file: an exact key of the table built at start-up
        entry = state.slides.get(slide_id)
        if entry is None:
            raise HTTPException(404, f"unknown slide {slide_id!r}")
        return entry

    def summary(entry: SlideEntry) -> dict[str, Any]:
        outputs = state.finder.find(entry)
        job = state.preprocessor.job(entry.slide_id)
        return {"id": entry.slide_id, "file": entry.path.name, "stage": outputs.stage,
                "available": entry.path.is_file(), "job": job.to_dict() if job else None}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return {"model": state.model_name, "waiting": state.worker.waiting,
                "attribution": state.worker.attribution_steps > 0,
                "preprocess": state.preprocessor.settings is not None,
                "preprocess_disabled_reason": state.preprocessor.disabled_reason}

    @app.get("/api/slides")
    def list_slides() -> list[dict[str, Any]]:
        return [summary(e) for e in state.slides.values()]

    @app.get("/api/slides/{slide_id}/image.dzi")
    def dzi(slide_id: str) -> Response:
        entry = entry_of(slide_id)
        try:
            dz = slides.deepzoom(entry)
        except InputError as exc:
            raise HTTPException(422, str(exc)) from exc
        return Response(dz.get_dzi("jpeg"), media_type="application/xml")

    @app.get("/api/slides/{slide_id}/image_files/{level}/{col}_{row}.jpeg")
    def tile(slide_id: str, level: int, col: int, row: int) -> Response:
        entry = entry_of(slide_id)
        try:
            dz = slides.deepzoom(entry)
        except InputError as exc:
            raise HTTPException(422, str(exc)) from exc
        if not 0 <= level < dz.level_count:
            raise HTTPException(404, "no such level")
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise HTTPException(404, "no such tile")
        buf = io.BytesIO()
        dz.get_tile(level, (col, row)).convert("RGB").save(buf, "JPEG", quality=TILE_QUALITY)
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/slides/{slide_id}/tissue")
    def tissue(slide_id: str) -> JSONResponse:
        outputs = state.finder.find(entry_of(slide_id))
        if outputs.geojson is None:
            raise HTTPException(404, f"slide {slide_id} is not segmented yet")
        return JSONResponse(json.loads(outputs.geojson.read_text()))

    @app.get("/api/slides/{slide_id}/patches")
    def patches(slide_id: str) -> dict[str, Any]:
        grid = patch_grid(state.finder.find(entry_of(slide_id)))
        if grid is None:
            raise HTTPException(404, f"slide {slide_id} is not tiled yet")
        return grid

    @app.post("/api/slides/{slide_id}/preprocess")
    def preprocess(slide_id: str) -> dict[str, Any]:
        entry = entry_of(slide_id)
        if state.preprocessor.settings is None:
            raise HTTPException(409, state.preprocessor.disabled_reason)
        if state.finder.find(entry).stage == "ready":
            return {"state": "done", "message": "already preprocessed"}
        return state.preprocessor.start(entry).to_dict()

    @app.get("/api/slides/{slide_id}/job")
    def job(slide_id: str) -> dict[str, Any]:
        found = state.preprocessor.job(entry_of(slide_id).slide_id)
        if found is None:
            raise HTTPException(404, f"no preprocessing job for slide {slide_id}")
        return found.to_dict()

    @app.post("/api/slides/{slide_id}/chat")
    async def chat(slide_id: str, request: ChatRequest = Body(...)) -> dict[str, Any]:
        entry = entry_of(slide_id)
        outputs = state.finder.find(entry)
        if outputs.store is None:
            raise HTTPException(409, f"slide {slide_id} has no features yet: preprocess it first")
        future = state.worker.submit(state.worker.answer, outputs.store, request.question, request.history)
        try:
            reply = await asyncio.wrap_future(future)
        except UserError as exc:  # the slide's store (empty, damaged, of another encoder), not the server
            raise HTTPException(422, str(exc)) from exc
        out: dict[str, Any] = {"answer": reply.answer, "answer_seconds": round(reply.answer_seconds, 3),
                               "attribution_seconds": round(reply.attribution_seconds, 3)}
        if reply.heat is not None:
            shown = display_heat(reply.heat)
            order = np.argsort(-reply.heat, kind="stable")
            out["heat"] = [round(float(h), 6) for h in reply.heat]
            out["display"] = [round(float(h), 4) for h in shown]
            out["top"] = [int(i) for i in order[:TOP_PATCHES] if shown[i] > 0]
        return out

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ----------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from slidechat.evaluate import add_generation_arguments

    p = command_parser("slidechat serve", __doc__,
                       "slidechat serve --model results/models/stage2 --slides results/demo/slides/labels.csv "
                       "--results results")
    p.add_argument("--model", required=True, help="trained model directory (ours, or released SlideChat weights)")
    p.add_argument("--llm", default=None, help="base LLM directory, when the model directory does not hold the LLM")
    p.add_argument("--slides", required=True, help="folder of slide files (id = file stem) or sample sheet CSV "
                   "(slide_id,path[,mpp])")
    p.add_argument("--results", default=None, help="results folder of a workflow run (segmentation/, patches/, "
                   "features/) whose outputs are shown")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help="per-slide cache for slides preprocessed from the page (the one `slidechat ask` uses)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the slides")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--encoder-checkpoint", default=None,
                   help="patch encoder weights, needed to preprocess slides from the page with conch_v1")
    p.add_argument("--attribution-steps", type=int, default=16,
                   help="integration steps of the per-patch heatmap (forward+backward passes per answer); "
                   "0: answers without heatmaps")
    add_generation_arguments(p)
    return p


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or a UsageError naming the address when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); the port is in use or the address is "
                         "not this machine's: pass another --port (or --host)") from None
    sock.listen(128)
    return sock


def feature_settings(model_dir: Path, encoder_checkpoint: str | None) -> tuple[FeatureSettings | None, str]:
    """How the page preprocesses a new slide: the patch encoder the model was trained on, or why it cannot."""
    recorded = model_feature_config(model_dir)
    encoder = recorded.get("feature_encoder")
    if not encoder:
        return None, (f"{model_dir} records no patch encoder (feature_encoder), so new slides cannot be "
                      "preprocessed here; run the workflow or `slidechat ask` on them")
    if encoder == "conch_v1" and not encoder_checkpoint:
        return None, "preprocessing with conch_v1 needs its weights: restart with --encoder-checkpoint PATH"
    settings = FeatureSettings(encoder=encoder, encoder_checkpoint=encoder_checkpoint,
                               transform=recorded.get("feature_transform"),
                               target_mpp=float(recorded.get("feature_target_mpp", 0.5)),
                               patch_size=int(recorded.get("feature_patch_size", 224)))
    return settings, ""


def build_state(a: argparse.Namespace) -> ServeState:
    """Check the arguments, load the model once and assemble what the app serves."""
    from slidechat.evaluate import load_model_on

    model_dir = Path(a.model)
    if not model_dir.exists():
        raise InputError(f"--model {model_dir}: no such model directory")
    if a.llm is not None and not Path(a.llm).is_dir():
        raise InputError(f"--llm {a.llm}: no such LLM directory")
    results = Path(a.results) if a.results else None
    if results is not None and not results.is_dir():
        raise InputError(f"--results {results}: no such folder (the workflow's results_dir)")
    if a.attribution_steps < 0:
        raise UsageError(f"--attribution-steps must be >= 0, got {a.attribution_steps}")
    table = read_slide_table(a.slides)
    settings, reason = feature_settings(model_dir, a.encoder_checkpoint)
    finder = OutputFinder(results, Path(a.cache_dir), model_feature_config(model_dir))
    try:
        model = load_model_on(model_dir, a.llm, a.device, a.dtype)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise InputError(f"--model {model_dir}: cannot load the model ({exc})") from exc
    worker = ModelWorker(model, max_new_tokens=a.max_new_tokens, attribution_steps=a.attribution_steps)
    return ServeState(table, finder, worker, Preprocessor(settings, finder, reason), model_dir.name)


def main(argv: list[str]) -> int:
    """`slidechat serve ...`: runs until interrupted."""
    import uvicorn

    a = build_parser().parse_args(argv)
    sock = bind_socket(a.host, a.port)  # before the (slow) model load: a taken port fails at once
    state = build_state(a)
    host, port = sock.getsockname()[:2]
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"slidechat serve: warning: listening on {a.host}, reachable from other machines", flush=True)
    ready = sum(state.finder.find(e).stage == "ready" for e in state.slides.values())
    print(f"slidechat serve: {len(state.slides)} slides ({ready} ready), model {state.model_name}; "
          f"open http://{host}:{port}/", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        state.worker.shutdown()
        state.preprocessor.shutdown()
    return 0
