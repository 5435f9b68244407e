"""Readers for slide-level VQA / caption benchmarks and the writer for model outputs.

Formats understood (``load_benchmark`` picks one from the file itself):

* SlideBench-VQA (TCGA) CSV, as published: ``ID, Slide, Tumor, Broad Category, Narrow Category, Question,
  A, B, C, D, Answer``.
* SlideBench-VQA (BCNB) CSV: ``ID, Slide, Task, Question, A, B, C, D, Answer``.
* The JSON form of SlideBench-VQA (TCGA) (``{"samples": [{slide_id, question, choices, answer, category}]}``);
  its question id is the row order (0-based), as in outputs made from it.
* WSI-Bench test JSON (LLaVA conversations, ``*_test.json``; a folder reads all of them): the ``*_choice``
  files are A-D multiple choice, ``Prognosis_TF`` is Yes/No, the others are open-ended (scored as captions).
* Caption CSVs (SlideBench-Caption style): a slide column (``Slide``/``slide_id``) and a reference column
  (``Caption``/``Report``/``Answer``/``reference``); an optional ``Question`` column overrides the prompt.

Every item keeps its input row so the output CSV is "the input columns + ``Output`` + ``Prediction``",
which is the original SlideChat test tool's format plus our parsed letter.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from preprocessing.stores import normalize_slide_id
from slidechat.template import IMAGE_TOKEN
from wsicore.errors import InputError
from wsicore.files import atomic_path, input_file, read_json

LETTERS = ("A", "B", "C", "D")
TCGA_COLUMNS = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", *LETTERS, "Answer"]
BCNB_COLUMNS = ["ID", "Slide", "Task", "Question", *LETTERS, "Answer"]
# Prompt used for caption benchmarks that carry no question of their own.
DEFAULT_CAPTION_PROMPT = "Please provide a detailed description of this whole slide image."
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class BenchmarkFormatError(InputError, ValueError):
    """A benchmark file that cannot be read as any supported format (names the missing columns/keys)."""


@dataclass
class BenchItem:
    """One benchmark question (closed: `options` + `answer`) or open-ended item (`reference`)."""

    qid: str
    slide_id: str
    question: str
    prompt: str  # text after IMAGE_TOKEN + "\n" that the model sees (without the optional letter instruction)
    options: dict[str, str] = field(default_factory=dict)  # label -> option text; empty for open-ended
    answer: str | None = None  # correct label (closed questions)
    reference: str | None = None  # reference text (open-ended / captions)
    broad_category: str | None = None
    narrow_category: str | None = None
    group: str | None = None  # tumour type (TCGA), task (BCNB, WSI-Bench) or project
    row: dict[str, Any] = field(default_factory=dict)  # input columns, for the output CSV

    @property
    def is_choice(self) -> bool:
        return bool(self.options)


@dataclass
class Benchmark:
    """A loaded benchmark: its items, the input column order and how its groups are named."""

    name: str
    format: str  # slidebench_tcga | slidebench_bcnb | slidebench_json | wsi_bench | caption_csv
    items: list[BenchItem]
    columns: list[str]
    group_name: str = "group"  # "tumor" | "task" | "project"
    path: str = ""

    @property
    def choice_items(self) -> list[BenchItem]:
        return [it for it in self.items if it.is_choice]

    @property
    def open_items(self) -> list[BenchItem]:
        return [it for it in self.items if not it.is_choice]

    def slide_ids(self) -> list[str]:
        return sorted({it.slide_id for it in self.items})


def format_mc_prompt(question: str, options: dict[str, str]) -> str:
    """SlideChat's test prompt body: ``{question}\\nA. {A}\\nB. {B}...`` (options with a value only)."""
    lines = [question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines)


def _clean(value: Any) -> str | None:
    """Cell value as a stripped string; None for empty/NaN."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    s = str(value).strip()
    return s or None


def normalize_answer(value: Any, labels: Iterable[str] = LETTERS) -> str | None:
    """Ground-truth answer label: tolerant of stray quotes/punctuation (one WSI-Bench answer is ``B "``)."""
    s = _clean(value)
    if s is None:
        return None
    labels = list(labels)
    for lab in labels:
        if s.lower() == lab.lower():
            return lab
    m = re.match(r"^\W*([A-Za-z]+)\b", s)
    if m:
        for lab in labels:
            if m.group(1).lower() == lab.lower():
                return lab
    return None


def _id_string(value: Any, default: str) -> str:
    """Question id as a string; ``17.0`` (a pandas float), ``017`` (a spreadsheet drops the zero) and ``17`` are
    the same id."""
    s = _clean(value)
    if s is None:
        return default
    if re.fullmatch(r"-?\d+(\.0+)?", s):
        s = str(int(s.split(".")[0]))
    return s


def _read_csv_rows(path: Path, what: str = "CSV file") -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(input_file(path, what), newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f for f in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BenchmarkFormatError(f"{path}: not a readable UTF-8 CSV ({exc}); expected a {what} (save it as "
                                   "CSV UTF-8)") from exc
    return fields, rows


def _require_columns(path: Path, fields: list[str], needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in fields]
    if missing:
        raise BenchmarkFormatError(f"{path}: {what} is missing column(s) {', '.join(missing)} (found: {', '.join(fields)})")


def _pick(fields: list[str], candidates: Iterable[str]) -> str | None:
    lower = {f.lower().strip(): f for f in fields}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    return None


def read_slidebench_csv(path: str | os.PathLike) -> Benchmark:
    """SlideBench-VQA CSV (TCGA with Tumor/Broad/Narrow Category, or BCNB with Task)."""
    path = Path(path)
    fields, rows = _read_csv_rows(path)
    fields = [f for f in fields if f]  # drop the unnamed pandas index column, if any
    if "Task" in fields and "Tumor" not in fields:
        fmt, needed, group_col, group_name = "slidebench_bcnb", BCNB_COLUMNS, "Task", "task"
    else:
        fmt, needed, group_col, group_name = "slidebench_tcga", TCGA_COLUMNS, "Tumor", "tumor"
    _require_columns(path, fields, [c for c in needed if c not in ("C", "D")], f"SlideBench {fmt.split('_')[1].upper()} CSV")
    items = []
    for i, row in enumerate(rows):
        options = {k: v for k in LETTERS if (v := _clean(row.get(k))) is not None}
        question = _clean(row.get("Question")) or ""
        slide = _clean(row.get("Slide"))
        if slide is None:
            raise BenchmarkFormatError(f"{path}: row {i + 2} has an empty Slide")
        answer = normalize_answer(row.get("Answer"), options)
        if answer is None:  # some releases give the option text instead of the letter
            text = _clean(row.get("Answer"))
            answer = next((k for k, v in options.items() if text and v.strip().lower() == text.lower()), None)
        items.append(BenchItem(
            qid=_id_string(row.get("ID"), str(i)), slide_id=normalize_slide_id(slide), question=question,
            prompt=format_mc_prompt(question, options), options=options, answer=answer,
            broad_category=_clean(row.get("Broad Category")), narrow_category=_clean(row.get("Narrow Category")),
            group=_clean(row.get(group_col)), row={c: row.get(c, "") for c in fields},
        ))
    return Benchmark(name=path.stem, format=fmt, items=items, columns=fields, group_name=group_name, path=str(path))


def _split_choice(choice: str) -> tuple[str, str]:
    m = re.match(r"^\s*\(?([A-Za-z])[\)\.:]\s*(.*)$", choice, re.S)
    if not m:
        raise BenchmarkFormatError(f"choice {choice!r} does not start with a letter label like 'A) '")
    return m.group(1).upper(), m.group(2).strip()


def read_slidebench_json(path: str | os.PathLike) -> Benchmark:
    """The JSON form (``{"samples": [...]}`` or a list) with slide_id, question, choices, answer, category."""
    path = Path(path)
    data = read_json(path, "SlideBench JSON")
    samples = data.get("samples") if isinstance(data, dict) else data
    if not isinstance(samples, list):
        raise BenchmarkFormatError(f"{path}: expected a list of samples or {{'samples': [...]}}")
    needed = ["slide_id", "question", "choices", "answer"]
    items = []
    for i, s in enumerate(samples):
        missing = [k for k in needed if k not in s]
        if missing:
            raise BenchmarkFormatError(f"{path}: sample {i} is missing key(s) {', '.join(missing)}")
        options = dict(_split_choice(c) for c in s["choices"])
        broad, _, narrow = str(s.get("category") or "").partition(" - ")
        question = str(s["question"]).strip()
        row = {"ID": str(i), "Slide": s["slide_id"], "Broad Category": broad.strip() or None,
               "Narrow Category": narrow.strip() or broad.strip() or None, "Question": question,
               **{k: options.get(k, "") for k in LETTERS}, "Answer": s["answer"]}
        items.append(BenchItem(
            qid=str(i), slide_id=normalize_slide_id(s["slide_id"]), question=question,
            prompt=format_mc_prompt(question, options), options=options,
            answer=normalize_answer(s["answer"], options), broad_category=row["Broad Category"],
            narrow_category=row["Narrow Category"], group=None, row=row,
        ))
    columns = ["ID", "Slide", "Broad Category", "Narrow Category", "Question", *LETTERS, "Answer"]
    return Benchmark(name=path.stem, format="slidebench_json", items=items, columns=columns, group_name="tumor",
                     path=str(path))


_INLINE_OPTION = re.compile(r"(?:^|\s)([A-D])\)\s")


def parse_inline_options(text: str) -> tuple[str, dict[str, str]]:
    """Split ``"Question? A) x B) y C) z D) w"`` into the stem and ``{A: x, ...}`` (WSI-Bench style)."""
    marks = [m for m in _INLINE_OPTION.finditer(text)]
    # keep the last run A, B, C[, D] in order (a question may mention "A)" itself earlier)
    for start in range(len(marks) - 1, -1, -1):
        if marks[start].group(1) != "A":
            continue
        run = marks[start:]
        if [m.group(1) for m in run] == list(LETTERS[: len(run)]) and len(run) >= 2:
            stem = text[: run[0].start()].strip()
            opts = {}
            for j, m in enumerate(run):
                end = run[j + 1].start() if j + 1 < len(run) else len(text)
                opts[m.group(1)] = text[m.end():end].strip()
            return stem, opts
    return text.strip(), {}


def _wsi_bench_task(path: Path) -> str:
    return re.sub(r"_test$", "", path.stem)


def read_wsi_bench(path: str | os.PathLike) -> Benchmark:
    """WSI-Bench test JSON file, or a folder of ``*_test.json`` files (question ids become ``<task>:<id>``)."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise BenchmarkFormatError(f"{path}: no WSI-Bench *.json files")
    items: list[BenchItem] = []
    for f in files:
        data = read_json(f, "WSI-Bench JSON")
        if not isinstance(data, list):
            raise BenchmarkFormatError(f"{f}: expected a JSON list of LLaVA-style records")
        task = _wsi_bench_task(f)
        for i, rec in enumerate(data):
            missing = [k for k in ("id", "image", "conversations") if k not in rec]
            if missing:
                raise BenchmarkFormatError(f"{f}: record {i} is missing key(s) {', '.join(missing)}")
            turns = {t.get("from"): t.get("value") for t in reversed(rec["conversations"]) if isinstance(t, dict)}
            human, target = turns.get("human"), turns.get("gpt")
            if not isinstance(human, str) or not isinstance(target, str):
                raise BenchmarkFormatError(f"{f}: record {i} needs a human and a gpt turn")
            text = human.replace(IMAGE_TOKEN, "").strip()
            image = rec["image"][0] if isinstance(rec["image"], list) else rec["image"]
            project = Path(image).parent.name or None
            qid = f"{task}:{rec['id']}" if len(files) > 1 else str(rec["id"])
            options: dict[str, str] = {}
            answer = reference = None
            if task.endswith("_TF_question") or task.endswith("_TF"):
                options = {"Yes": "Yes", "No": "No"}
                answer = normalize_answer(target, options)
                question = text
            elif "choice" in task:
                question, options = parse_inline_options(text)
                answer = normalize_answer(target, options)
            else:
                question, reference = text, target
            row = {"ID": qid, "Slide": normalize_slide_id(image), "Task": task, "Project": project,
                   "Question": text, "Answer": target.strip()}
            items.append(BenchItem(
                qid=qid, slide_id=normalize_slide_id(image), question=question, prompt=text, options=options,
                answer=answer, reference=reference, broad_category=task, narrow_category=task, group=project,
                row=row,
            ))
    return Benchmark(name=path.stem if path.is_file() else path.name, format="wsi_bench", items=items,
                     columns=["ID", "Slide", "Task", "Project", "Question", "Answer"], group_name="project",
                     path=str(path))


def read_caption_csv(path: str | os.PathLike, prompt: str = DEFAULT_CAPTION_PROMPT) -> Benchmark:
    """Caption CSV: slide column + reference caption column (+ optional ID, Question, Tumor)."""
    path = Path(path)
    fields, rows = _read_csv_rows(path)
    fields = [f for f in fields if f]
    slide_col = _pick(fields, ["Slide", "slide_id", "slide"])
    ref_col = _pick(fields, ["Caption", "caption", "Report", "reference", "Answer", "Description"])
    missing = [n for n, c in (("Slide (or slide_id)", slide_col), ("Caption (or Report/Answer/reference)", ref_col)) if c is None]
    if missing:
        raise BenchmarkFormatError(f"{path}: caption CSV is missing column(s) {', '.join(missing)} (found: {', '.join(fields)})")
    q_col = _pick(fields, ["Question", "prompt"])
    id_col = _pick(fields, ["ID", "id"])
    group_col = _pick(fields, ["Tumor", "Task", "Project"])
    items = []
    for i, row in enumerate(rows):
        question = _clean(row.get(q_col)) if q_col else None
        items.append(BenchItem(
            qid=_id_string(row.get(id_col), str(i)) if id_col else str(i),
            slide_id=normalize_slide_id(row[slide_col]), question=question or prompt, prompt=question or prompt,
            reference=_clean(row.get(ref_col)) or "", group=_clean(row.get(group_col)) if group_col else None,
            row={c: row.get(c, "") for c in fields},
        ))
    if not id_col:
        for i, (it, row) in enumerate(zip(items, rows)):
            it.row = {"ID": str(i), **it.row}
        fields = ["ID", *fields]
    return Benchmark(name=path.stem, format="caption_csv", items=items, columns=fields,
                     group_name=(group_col or "group").lower(), path=str(path))


def load_benchmark(path: str | os.PathLike, caption_prompt: str = DEFAULT_CAPTION_PROMPT) -> Benchmark:
    """Read any supported benchmark file (or WSI-Bench folder), detecting the format from its content.

    Question ids must be unique: answers are matched to questions by id."""
    try:
        bench = _read_benchmark(Path(path), caption_prompt)
    except BenchmarkFormatError:
        raise
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from exc
    counts = Counter(it.qid for it in bench.items)
    dup = sorted(q for q, c in counts.items() if c > 1)
    if dup:
        raise BenchmarkFormatError(f"{path}: question id(s) {', '.join(dup[:10])}{' ...' if len(dup) > 10 else ''} "
                                   "appear more than once; answers are matched by id, so each must be unique")
    return bench


# What a file of the wrong kind raises while parsed: cut or invalid JSON, bytes that are not text, JSON of
# another shape, nesting deeper than the parser goes.
_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError)


def _unreadable(path: str | os.PathLike, exc: BaseException) -> BenchmarkFormatError:
    return BenchmarkFormatError(f"{path}: cannot be read as a benchmark or slide list "
                                f"({type(exc).__name__}: {str(exc)[:200]})")


def benchmark_slide_ids(path: str | os.PathLike) -> set[str]:
    """The slide ids an evaluation file names, for the leakage guard: as `load_benchmark` reads them, and for
    files it does not read as a benchmark, from their slide column (MultiPathQA's `image_path`, `slide_id`,
    `slide`, `image`) or, in JSON lists of records, from `slide_id` / `image` (training JSON)."""
    path = Path(path)
    try:
        return set(load_benchmark(path).slide_ids())
    except BenchmarkFormatError:
        if path.is_dir():  # a folder is a WSI-Bench folder or nothing
            raise
    try:
        ids = _listed_slide_ids(path)
    except BenchmarkFormatError:
        raise
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from exc
    if not ids:  # a guard that excludes nothing must not pass for one that worked
        raise BenchmarkFormatError(f"{path}: names no slide (no benchmark format, no slide column, no records with "
                                   "slide_id or image); the leakage guard cannot use it")
    return ids


def _listed_slide_ids(path: Path) -> set[str]:
    ids: set[str] = set()
    if path.suffix.lower() == ".csv":
        fields, rows = _read_csv_rows(path)
        col = _pick(fields, ["Slide", "slide_id", "image_path", "image", "slide_path"])
        if col is None:
            raise BenchmarkFormatError(f"{path}: no slide column (expected Slide, slide_id or image_path); "
                                       f"found: {', '.join(f for f in fields if f)}")
        return {normalize_slide_id(r[col]) for r in rows if r.get(col)}
    data = read_json(path, "benchmark or training JSON")
    items = data.get("samples", data.get("data", [])) if isinstance(data, dict) else data
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        image = item.get("image")
        names = [item.get(k) for k in ("slide_id", "Slide", "slide")] + ([image] if isinstance(image, str) else image or [])
        ids |= {normalize_slide_id(n) for n in names if isinstance(n, str) and n}
    return ids


def _read_benchmark(path: Path, caption_prompt: str) -> Benchmark:
    if not path.exists():
        raise InputError(f"benchmark not found: {path} (option --benchmark)")
    if path.is_dir():
        return read_wsi_bench(path)
    if path.suffix.lower() == ".csv":
        fields, _ = _read_csv_rows(path)
        if "Question" in fields and "A" in fields and "B" in fields:
            return read_slidebench_csv(path)
        if _pick(fields, ["Caption", "caption", "Report", "reference", "Description"]) or (
            "Answer" in fields and "A" not in fields
        ):
            return read_caption_csv(path, caption_prompt)
        # Most likely a VQA CSV with columns missing: name what SlideBench TCGA needs.
        missing = [c for c in TCGA_COLUMNS if c not in fields]
        raise BenchmarkFormatError(
            f"{path}: not a SlideBench VQA CSV (missing column(s) {', '.join(missing)}) nor a caption CSV "
            f"(needs Slide + Caption); found: {', '.join(f for f in fields if f)}"
        )
    if path.suffix.lower() == ".json":
        data = read_json(path, "benchmark JSON")
        samples = data.get("samples") if isinstance(data, dict) else data
        first = samples[0] if isinstance(samples, list) and samples else None
        if isinstance(first, dict) and "conversations" in first:
            return read_wsi_bench(path)
        if isinstance(first, dict) and ("choices" in first or "slide_id" in first):
            return read_slidebench_json(path)
        raise BenchmarkFormatError(
            f"{path}: JSON is neither SlideBench ({{'samples': [{{slide_id, question, choices, answer}}]}}) "
            "nor WSI-Bench (LLaVA records with id, image, conversations)"
        )
    raise BenchmarkFormatError(f"{path}: unsupported benchmark file type {path.suffix!r} (.csv, .json or a folder)")


# --------------------------------------------------------------------------------------------- outputs


def output_columns(bench: Benchmark, extra: Iterable[str] = ()) -> list[str]:
    """Input columns + ``Output`` + ``Prediction`` (+ our status / settings columns)."""
    cols = list(bench.columns)
    for c in ["Output", "Prediction", *extra]:
        if c not in cols:
            cols.append(c)
    return cols


def write_outputs_csv(path: str | os.PathLike, bench: Benchmark, outputs: dict[str, dict[str, Any]],
                      extra_columns: Iterable[str] = ()) -> Path:
    """Write one row per benchmark item: its input columns, ``Output`` (raw text), ``Prediction`` and extras.

    `outputs` maps question id -> {"Output": str, "Prediction": str, ...}; items without an entry get empty
    cells (they are then reported as skipped by the scorer).
    """
    cols = output_columns(bench, extra_columns)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for it in bench.items:
                row = {c: it.row.get(c, "") for c in bench.columns}
                row.update({k: ("" if v is None else v) for k, v in outputs.get(it.qid, {}).items()})
                w.writerow(row)
    return path


def read_outputs_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of an outputs CSV (ours or the original tool's, whose first column is an unnamed index)."""
    path = Path(path)
    fields, rows = _read_csv_rows(path, "outputs CSV")
    if "Output" not in fields:
        raise BenchmarkFormatError(f"{path}: outputs CSV is missing column Output (found: {', '.join(fields)})")
    return rows


def match_output_rows(bench: Benchmark, rows: list[dict[str, str]], path: str = "outputs") -> dict[str, dict[str, str] | None]:
    """Question id -> its outputs row (None when absent). Matched by ``ID`` when the outputs have that column,
    else by row order (the JSON form)."""
    result: dict[str, dict[str, str] | None] = {it.qid: None for it in bench.items}
    if rows and "ID" in rows[0]:
        counts = Counter(_id_string(r.get("ID"), "") for r in rows)
        dup = sorted(q for q, c in counts.items() if c > 1)
        if dup:
            raise BenchmarkFormatError(f"{path}: question ID(s) {', '.join(dup[:10])}{' ...' if len(dup) > 10 else ''} "
                                       f"appear in more than one row; an outputs file holds one answer per question "
                                       "(were runs concatenated?)")
        for r in rows:
            qid = _id_string(r.get("ID"), "")
            if qid in result:
                result[qid] = r
        if result and not any(result.values()):  # not a partial run: answers to other questions
            shown = ", ".join(sorted(counts)[:5]) + (" ..." if len(counts) > 5 else "")
            raise BenchmarkFormatError(f"{path}: none of its {len(counts)} question IDs ({shown}) is a question of "
                                       f"{bench.path or bench.name}; are these the outputs of another benchmark (or "
                                       "of one WSI-Bench file scored against the folder)?")
        return result
    if len(rows) != len(bench.items):
        raise BenchmarkFormatError(
            f"{path}: has no ID column and {len(rows)} rows for {len(bench.items)} questions; cannot match by row order"
        )
    for it, r in zip(bench.items, rows):
        result[it.qid] = r
    return result


def match_outputs(bench: Benchmark, rows: list[dict[str, str]], path: str = "outputs") -> dict[str, str | None]:
    """Question id -> raw output text (None when the row is missing or its Output is empty)."""
    return {q: (_clean(r.get("Output")) if r else None) for q, r in match_output_rows(bench, rows, path).items()}


SKIP_STATUSES = ("no_features", "no_patches")  # `Status` of questions the evaluator did not ask


def skipped_in_outputs(bench: Benchmark, rows: list[dict[str, str]], path: str = "outputs") -> dict[str, str]:
    """Question id -> status, for questions our evaluator did not ask (`Status` no_features / no_patches;
    the original tool has no such column)."""
    return {q: r["Status"] for q, r in match_output_rows(bench, rows, path).items()
            if r and (r.get("Status") or "") in SKIP_STATUSES}
