"""Benchmark evaluation: generation over a benchmark with per-slide encoding reuse, then scoring and reports.

Each slide is encoded once (slide encoder + projector) and the encoding is reused for all of its questions,
which are generated in batches (greedy, KV cache). The prompt is the original tool's:
``<image>\\n{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}`` inside the model's chat template.

``slidechat evaluate --benchmark FILE --features-dir DIR --model MODEL_DIR [--llm DIR] --out-dir OUT`` writes
``outputs.csv`` (input columns + ``Output`` + ``Prediction`` + status/settings), ``metrics.json``,
``report.md``, ``report.html`` and ``category_accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from preprocessing.stores import FeatureStoreIndex, read_slide_map
from wsicore.cli import command_parser
from wsicore.errors import InputError
from wsicore.files import output_folder, write_json
from wsicore.progress import Progress
from wsicore.settings import add_arguments, from_arguments, setting
from slidechat.benchmarks_io import (
    DEFAULT_CAPTION_PROMPT,
    LETTER_INSTRUCTION,
    Benchmark,
    BenchItem,
    load_benchmark,
    write_outputs_csv,
)
from slidechat.model_card import trained_on_features
from slidechat.scoring import extract_answer, load_judge, score_outputs, summary_lines, warn_leakage
from slidechat.template import IMAGE_TOKEN

OUTPUT_EXTRA_COLUMNS = ["Status", "MaxNewTokens", "LetterInstruction"]


@dataclass
class EvalSettings:
    """Benchmark evaluation (config section `evaluation`); every setting is recorded in outputs.csv / metrics.json."""

    max_new_tokens: int = setting(500, minimum=1, help="generation budget per answer")
    answer_with_letter: bool = setting(
        False, help=f"append '{LETTER_INSTRUCTION}' to closed questions (off, as the original)")
    batch_size: int = setting(8, minimum=1, help="questions of one slide per generate call (at most)")
    max_batch_tokens: int = setting(
        40960, minimum=1,
        help="visual tokens per generate call at most (questions x the slide's tokens): the attention mask and KV "
             "cache grow with batch x length, so a 38,400-token slide is answered one question at a time")
    reuse_slide_encoding: bool = setting(
        True, help="encode each slide once for all its questions (false: once per question, for checks)")
    greedy: bool = field(default=True, metadata={"config": False, "cli": False})  # recorded; sampling is not offered
    caption_prompt: str = setting(DEFAULT_CAPTION_PROMPT, help="prompt for caption CSVs without a question")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"config": False, "cli": False})


def build_question(item: BenchItem, settings: EvalSettings) -> str:
    """The first user turn: ``<image>\\n`` + the item's prompt (+ the optional letter instruction)."""
    text = item.prompt
    if settings.answer_with_letter and item.is_choice and all(len(k) == 1 for k in item.options):
        text = f"{text}\n{LETTER_INSTRUCTION}"
    return f"{IMAGE_TOKEN}\n{text}"


# ------------------------------------------------------------------------------------------ feature stores


def check_feature_width(store: str | os.PathLike, features: Any, attrs: dict, expected: int | None) -> None:
    """A store whose features the model cannot take (another encoder's width) is refused, naming the slide."""
    from preprocessing.stores import StoreError, slide_id_of_store

    width = features.shape[1] if features.ndim == 2 else None
    if expected is not None and len(features) and width != expected:
        raise StoreError(f"slide {attrs.get('slide_id') or slide_id_of_store(Path(store))}: its store {store} holds "
                         f"{width}-d features (encoder {attrs.get('encoder', 'unknown')}), but the model takes "
                         f"{expected}-d features; extract the slide's features with the encoder the model was "
                         "trained on")


def load_slide_tensor(store: Path, device: Any = "cpu", dtype: Any = None, feature_dim: int | None = None):
    """Features of one store as a float tensor (N, D) on `device`; D must be `feature_dim` (the model's) if given."""
    import torch

    from preprocessing.stores import load_features

    fs = load_features(store)
    check_feature_width(store, fs.features, fs.attrs, feature_dim)
    t = torch.from_numpy(fs.features)
    return t.to(device=device, dtype=dtype or torch.float32)


# ------------------------------------------------------------------------------------------------ model


def check_model_paths(model_dir: str | os.PathLike, llm: str | os.PathLike | None = None) -> None:
    """The model path holds a model and the LLM path an LLM (checked before slow work; nothing is read)."""
    from slidechat.checkpoint import model_layout

    model_layout(model_dir)
    if llm is not None and not Path(llm).is_dir():
        raise InputError(f"LLM directory not found: {llm} (option --llm)")
    if llm is not None and not (Path(llm) / "config.json").is_file():
        raise InputError(f"{llm}: not a Hugging Face model directory (no config.json) (option --llm)")


def load_model_on(model_dir: str | os.PathLike, llm: str | os.PathLike | None = None, device: str | None = None,
                  dtype: str | None = None):
    """`checkpoint.load_model(model_dir, llm=llm)` in eval mode on `device` (default: cuda when present)."""
    import torch

    from slidechat.checkpoint import load_model

    check_model_paths(model_dir, llm)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else None
    model = load_model(str(model_dir), llm=str(llm) if llm else None, torch_dtype=torch_dtype)
    if torch_dtype is not None:
        model = model.to(dtype=torch_dtype)
    model = model.to(device)
    model.eval()
    return model


def model_device_dtype(model) -> tuple[Any, Any]:
    """Device and dtype the slide encoder expects its features in (those of the projector's weights)."""
    w = model.projector.model[0].weight
    return w.device, w.dtype


# ------------------------------------------------------------------------------------------- generation


@dataclass
class GenerationResult:
    outputs: dict[str, dict[str, Any]]  # qid -> row values (Output, Prediction, Status, ...)
    skipped: dict[str, str]  # qid -> why it was not asked: no_features (no store) | no_patches (empty store)
    timing: dict[str, float]


def questions_per_call(settings: EvalSettings, visual_tokens: int) -> int:
    """Questions of one slide answered by one generate call: at most `batch_size`, and together at most
    `max_batch_tokens` visual tokens (a batch of 8 at 38,400 tokens needs ~33 GiB for the mask alone)."""
    return max(1, min(settings.batch_size, settings.max_batch_tokens // max(1, visual_tokens)))


def _generate(model, features, questions: list[str], visual_embeds, settings: EvalSettings) -> list[str]:
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens}
    if settings.greedy:
        kwargs["do_sample"] = False
    out = model.generate(features, questions, visual_embeds=visual_embeds, **kwargs)
    return [out] if isinstance(out, str) else list(out)


def generate_for_benchmark(model, bench: Benchmark, finder: FeatureStoreIndex, settings: EvalSettings,
                           log: Callable[[str], None] | None = print,
                           done: dict[str, dict[str, Any]] | None = None,
                           on_slide_done: Callable[[dict[str, dict[str, Any]]], None] | None = None,
                           progress: Progress | None = None,
                           trained_on: tuple[str, dict] | None = None) -> GenerationResult:
    """Answer every item of `bench`; slides without a feature store, or whose store holds no patches (no
    tissue), are skipped and listed.

    With ``reuse_slide_encoding`` each slide's features are encoded once (``model.encode_slide``) and the
    projected tokens are passed as ``visual_embeds`` to batched ``generate`` calls; otherwise every question
    re-encodes its slide (the slow reference path measured by ``benchmarks/bench_eval_reuse.py``).
    `done` holds answers from an interrupted run (their questions are not asked again); `on_slide_done`
    receives each slide's new answers as soon as they exist (for the resumable partial file); `progress`
    counts the questions answered (a line per slide instead of the log's); `trained_on` (model directory, its
    card's feature provenance) refuses stores made otherwise than the model's training stores.
    """
    import torch

    from preprocessing.stores import SameFeatures, read_store_attrs

    device, dtype = model_device_dtype(model)
    same = SameFeatures(trained_on)  # one evaluation: features of one extraction, the one the model learnt on
    by_slide: OrderedDict[str, list[BenchItem]] = OrderedDict()
    for it in bench.items:
        by_slide.setdefault(it.slide_id, []).append(it)
    outputs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    t_load = t_enc = t_gen = 0.0
    common = {"MaxNewTokens": settings.max_new_tokens, "LetterInstruction": settings.answer_with_letter}
    done = done or {}
    n_new = 0
    for k, (slide_id, all_items) in enumerate(by_slide.items()):
        for it in all_items:
            if it.qid in done:
                outputs[it.qid] = done[it.qid]
        items = [it for it in all_items if it.qid not in done]
        if not items:
            continue
        store = finder.find(slide_id)
        t0 = time.perf_counter()
        if store is not None:
            same.add(store, read_store_attrs(store))
        feats = load_slide_tensor(store, device, dtype, model.config.feature_dim) if store is not None else None
        t1 = time.perf_counter()
        if feats is None or feats.shape[0] == 0:
            status = "no_features" if feats is None else "no_patches"
            for it in items:
                skipped[it.qid] = status
                outputs[it.qid] = {"Output": "", "Prediction": "", "Status": status, **common}
            if on_slide_done:
                on_slide_done({it.qid: outputs[it.qid] for it in items})
            if log:
                why = "no feature store" if feats is None else f"{store} holds no patches"
                log(f"[{k + 1}/{len(by_slide)}] {slide_id}: {why}, {len(items)} question(s) skipped")
            if progress:
                progress.update(len(items), slide=slide_id, skipped=status)
            continue
        t_load += t1 - t0
        visual = None
        with torch.inference_mode():
            if settings.reuse_slide_encoding:
                visual = model.encode_slide(feats)
                t_enc += time.perf_counter() - t1
            answers: list[str] = []
            questions = [build_question(it, settings) for it in items]
            bs = questions_per_call(settings, visual.shape[0]) if settings.reuse_slide_encoding else 1
            t2 = time.perf_counter()
            for j in range(0, len(questions), max(1, bs)):
                batch = questions[j:j + bs]
                if settings.reuse_slide_encoding:
                    answers += _generate(model, None, batch, visual, settings)
                else:
                    answers += _generate(model, feats, batch, None, settings)
            t_gen += time.perf_counter() - t2
        for it, ans in zip(items, answers):
            pred = extract_answer(ans, it.options) if it.is_choice else None
            outputs[it.qid] = {"Output": ans, "Prediction": pred or "", "Status": "ok", **common}
        n_new += len(items)
        if on_slide_done:
            on_slide_done({it.qid: outputs[it.qid] for it in items})
        if progress:
            progress.update(len(items), slide=slide_id, patches=int(feats.shape[0]))
        elif log:
            log(f"[{k + 1}/{len(by_slide)}] {slide_id}: {feats.shape[0]} patches, {len(items)} question(s)")
    busy = t_load + t_enc + t_gen
    timing = {"load_s": t_load, "encode_s": t_enc, "generate_s": t_gen,
              "questions_per_s": n_new / busy if n_new and busy > 0 else 0.0, "n_generated": n_new,
              "n_resumed": sum(q in outputs for q in done)}
    return GenerationResult(outputs, skipped, timing)


def evaluate(benchmark: str | os.PathLike, features_dir: str | os.PathLike | None, model_dir: str | os.PathLike,
             out_dir: str | os.PathLike, llm: str | os.PathLike | None = None,
             settings: EvalSettings | None = None, slide_map: str | os.PathLike | None = None,
             train_manifests: Iterable[str | os.PathLike] = (), device: str | None = None,
             dtype: str | None = None, model=None, judge=None, limit: int | None = None,
             log: Callable[[str], None] | None = print, resume: bool = True) -> dict[str, Any]:
    """Generate, score and report one benchmark into `out_dir`; returns the metrics dict.

    `model` may be passed in (already loaded) to evaluate several benchmarks with one load. Answers are
    appended per slide to `out_dir/.outputs.partial.jsonl`; with `resume` a rerun after a crash reuses
    those made with the same settings and removes the file when done.
    """
    settings = settings or EvalSettings()
    bench = load_benchmark(benchmark, caption_prompt=settings.caption_prompt)
    if limit:
        bench.items = bench.items[:limit]
    finder = FeatureStoreIndex(features_dir, read_slide_map(slide_map) if slide_map else None)
    if model is None:
        model = load_model_on(model_dir, llm, device, dtype)
    out = output_folder(out_dir, "--out-dir")
    partial = out / PARTIAL_FILE
    key = _resume_key(benchmark, model_dir, llm, settings, limit, features_dir, slide_map)
    done = _read_partial(partial, key, log) if resume else {}
    if not resume or not done:
        partial.write_text(json.dumps({"resume_key": key}) + "\n")

    def append(rows: dict[str, dict[str, Any]]) -> None:
        with open(partial, "a") as fh:  # one line per answer, flushed per slide: a crash loses one slide at most
            for q, v in rows.items():
                fh.write(json.dumps({"qid": q, **v}) + "\n")

    t0 = time.perf_counter()
    n_done = sum(it.qid in done for it in bench.items)
    with Progress(len(bench.items), f"evaluation {bench.name}", "question", initial=n_done,
                  enabled=log is not None) as progress:
        gen = generate_for_benchmark(model, bench, finder, settings, log=log, done=done, on_slide_done=append,
                                     progress=progress, trained_on=trained_on_features(model_dir))
    wall = time.perf_counter() - t0
    write_outputs_csv(out / "outputs.csv", bench, gen.outputs, extra_columns=OUTPUT_EXTRA_COLUMNS)
    raw = {q: (v["Output"] if v.get("Status") == "ok" else None) for q, v in gen.outputs.items()}
    record = {
        "model": str(model_dir), "llm": str(llm) if llm else None, "features_dir": str(features_dir),
        "max_new_tokens": settings.max_new_tokens, "answer_with_letter_instruction": settings.answer_with_letter,
        "letter_instruction_text": LETTER_INSTRUCTION if settings.answer_with_letter else None,
        "greedy": settings.greedy, "batch_size": settings.batch_size, "max_batch_tokens": settings.max_batch_tokens,
        "reuse_slide_encoding": settings.reuse_slide_encoding,
        "prompt_format": IMAGE_TOKEN + "\\n{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}",
        "wall_s": round(wall, 3), **{k: round(v, 4) for k, v in gen.timing.items()}, **settings.extra,
    }
    metrics = score_outputs(bench, raw, gen.skipped, train_manifests, settings=record, judge=judge)
    for status in ("no_features", "no_patches"):
        key = "skipped_slides" if status == "no_features" else "skipped_slides_no_patches"
        metrics[key] = sorted({it.slide_id for it in bench.items if gen.skipped.get(it.qid) == status})
    write_json(out / "metrics.json", metrics)
    from slidechat.report import write_report

    write_report(metrics, out)
    if log:
        for line in summary_lines(metrics):
            log(line)
    warn_leakage(metrics)
    partial.unlink(missing_ok=True)
    return metrics


PARTIAL_FILE = ".outputs.partial.jsonl"


def _resume_key(benchmark: Any, model_dir: Any, llm: Any, settings: EvalSettings, limit: int | None,
                features_dir: Any, slide_map: Any) -> dict[str, Any]:
    """What must not change for answers of an interrupted run to be reused: the benchmark, the model (its
    weights, not only its path: it may have been trained again into the same folder), the features and the
    settings."""
    from slidechat.checkpoint import model_digest

    b = Path(benchmark)
    return {"benchmark": str(b.resolve()), "benchmark_mtime_ns": b.stat().st_mtime_ns,
            "model": str(Path(model_dir).resolve()), "model_weights": model_digest(model_dir),
            "llm": str(llm) if llm else None,
            "features_dir": str(Path(features_dir).resolve()) if features_dir else None,
            "features_mtime_ns": _newest_mtime_ns(features_dir),
            "slide_map": str(Path(slide_map).resolve()) if slide_map else None,
            "slide_map_mtime_ns": _newest_mtime_ns(slide_map),
            "max_new_tokens": settings.max_new_tokens, "answer_with_letter": settings.answer_with_letter,
            "greedy": settings.greedy, "caption_prompt": settings.caption_prompt, "limit": limit}


def _newest_mtime_ns(path: Any) -> int | None:
    """Newest modification time of a file, or of a folder and what it holds directly (a rewritten model
    directory or a store added to a features folder changes it)."""
    if not path or not Path(path).exists():
        return None
    p = Path(path)
    return max([p.stat().st_mtime_ns] + ([c.stat().st_mtime_ns for c in p.iterdir()] if p.is_dir() else []))


def _read_partial(path: Path, key: dict[str, Any], log: Callable[[str], None] | None) -> dict[str, dict[str, Any]]:
    """Answers of an interrupted run with the same settings (empty when none or when settings differ)."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except ValueError:
        head = {}
    if head.get("resume_key") != key:
        if log:
            log(f"{path}: from a run with other settings; starting afresh")
        return {}
    done: dict[str, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by the crash
            continue
        if row.get("Status") == "ok":  # skipped slides are looked up again
            done[row.pop("qid")] = row
    if log and done:
        log(f"resuming: {len(done)} answer(s) from an interrupted run reused")
    return done


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the model to this dtype (default: as loaded)")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=500, help="generation budget per answer (default 500)")
    add_device_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("slidechat evaluate", __doc__,
                       "slidechat evaluate --benchmark bench.csv --features-dir F --model models/stage2 --out-dir OUT")
    p.add_argument("--benchmark", required=True, help="SlideBench CSV/JSON, WSI-Bench JSON/folder or caption CSV")
    p.add_argument("--features-dir", required=True, help="folder with <Slide>.zarr / .h5 / .csv feature stores")
    p.add_argument("--model", required=True, help="model directory (ours, released SlideChat weights, xtuner layout)")
    p.add_argument("--llm", default=None, help="local LLM directory when the model directory does not contain it")
    p.add_argument("--out-dir", required=True, help="results/eval/<bench>/")
    p.add_argument("--slide-map", default=None,
                   help="CSV: benchmark slide id (Slide/slide_id/image) -> store (features) and/or slide_id")
    p.add_argument("--train-manifest", nargs="*", default=[], help="training manifest(s) for the leakage check")
    p.add_argument("--judge", default=None, help="optional LLM-as-judge hook module:function(reference, hypothesis)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (smoke tests)")
    p.add_argument("--no-resume", action="store_true", help="ignore answers left by an interrupted run")
    add_device_arguments(p)
    add_arguments(p.add_argument_group("generation (config section `evaluation`)"), EvalSettings)
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    settings = from_arguments(EvalSettings, a)
    evaluate(a.benchmark, a.features_dir, a.model, a.out_dir, llm=a.llm, settings=settings, slide_map=a.slide_map,
             train_manifests=a.train_manifest, device=a.device, dtype=a.dtype, judge=load_judge(a.judge),
             limit=a.limit, log=lambda s: print(s, file=sys.stderr), resume=not a.no_resume)
    print(Path(a.out_dir) / "metrics.json")
    return 0
