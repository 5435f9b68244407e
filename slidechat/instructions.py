"""Instruction data assembly: SlideInstruction JSON -> training JSON tied to our feature stores.

Input records look like SlideChat's released SlideInstruction files::

    {"id": "train::0", "image": ["TCGA-A7-A0CJ-01Z-00-DX2.csv"],
     "conversations": [{"from": "human", "value": "...<image>"}, {"from": "gpt", "value": "..."}]}

Each record's image name is mapped to a slide id (the file stem, TCGA barcodes cut at the first dot, or an
explicit `--slide-map` CSV), and the slide id to a feature store in `--features-dir` (`<id>.zarr`, `<id>.h5`
or a released SlideChat `<id>.csv`, also one folder deep as in `TCGA_patch_feat/<TUMOR>/<id>.csv`).
Nothing crashes on one bad record: malformed records and records without features are dropped, counted
and listed by id in `<out>.manifest.json`. A leakage guard removes every slide (or, with
`leakage_level="case"`, every TCGA patient) that appears in an evaluation set.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from wsicore.cli import command_parser
from wsicore.files import sha256_file, write_json
from wsicore.settings import add_arguments, from_arguments, setting

IMAGE_TOKEN = "<image>"
STORE_SUFFIXES = (".zarr", ".h5", ".csv")  # preference order when one slide has several stores
_STRIP_SUFFIXES = (".csv", ".pt", ".pth", ".h5", ".zarr", ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".json")
# TCGA slide barcode, e.g. TCGA-A7-A0CJ-01Z-00-DX2 (WSI-Bench appends ".<uuid>" to it).
_TCGA_SLIDE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-[0-9]{2}[A-Z]?-[0-9]{2}-[A-Z]{2}[0-9A-Z]*)", re.I)


def normalize_slide_id(name: str) -> str:
    """Slide id from an image name or path: basename without a known extension; TCGA barcodes cut at the first dot."""
    base = os.path.basename(str(name).strip().rstrip("/"))
    lowered = base.lower()
    for suffix in _STRIP_SUFFIXES:
        if lowered.endswith(suffix):
            base = base[: -len(suffix)]
            break
    m = _TCGA_SLIDE.match(base)
    if m and (len(base) == m.end() or base[m.end()] == "."):
        return m.group(1).upper()
    return base


def leak_key(slide_id: str, level: str = "slide") -> str:
    """Key compared by the leakage guard: the slide id, or for `level="case"` the TCGA patient (first 12 chars)."""
    if level == "case" and _TCGA_SLIDE.match(slide_id):
        return slide_id[:12].upper()
    return slide_id


def load_benchmark_slide_ids(path: str | os.PathLike) -> set[str]:
    """Slide ids named by an evaluation file.

    Understands SlideBench CSV (`Slide` column), MultiPathQA CSV (`image_path`), other CSVs with a
    `slide_id`/`slide` column, SlideBench JSON (`{"samples": [{"slide_id": ...}]}`) and LLaVA/SlideInstruction
    style JSON lists (`image` as a string or list).
    """
    path = Path(path)
    ids: set[str] = set()
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = {c.lower().strip(): c for c in (reader.fieldnames or [])}
            col = next((cols[c] for c in ("slide", "slide_id", "image_path", "image", "slide_path") if c in cols), None)
            if col is None:
                raise ValueError(f"{path}: no slide column (expected one of Slide, slide_id, image_path)")
            for row in reader:
                if row.get(col):
                    ids.add(normalize_slide_id(row[col]))
        return ids
    data = json.loads(path.read_text())
    items: Iterable[Any] = data.get("samples", data.get("data", [])) if isinstance(data, dict) else data
    for item in items:
        if not isinstance(item, dict):
            continue
        for key in ("slide_id", "Slide", "slide"):
            if isinstance(item.get(key), str):
                ids.add(normalize_slide_id(item[key]))
        image = item.get("image")
        for name in [image] if isinstance(image, str) else (image or []):
            if isinstance(name, str):
                ids.add(normalize_slide_id(name))
    return ids


def index_feature_stores(features_dir: str | os.PathLike) -> dict[str, Path]:
    """Map slide id -> feature store found in `features_dir` (top level and one folder deep)."""
    root = Path(features_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"features directory not found: {root} (option --features-dir)")
    found: dict[str, Path] = {}
    candidates = list(root.iterdir())
    for sub in list(candidates):
        if sub.is_dir() and sub.suffix != ".zarr" and not sub.name.startswith("."):
            candidates.extend(sub.iterdir())
    rank = {s: i for i, s in enumerate(STORE_SUFFIXES)}
    for p in sorted(candidates):
        if p.name.startswith(".") or p.suffix not in rank:  # hidden = in-progress atomic temp files
            continue
        sid = normalize_slide_id(p.name)
        if sid not in found or rank[p.suffix] < rank[found[sid].suffix]:
            found[sid] = p
    return found


def load_slide_map(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """`--slide-map` CSV: column `image` (name as in the JSON, or its stem) and `slide_id` and/or `features`."""
    out: dict[str, dict[str, str]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if "image" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: slide map needs a column `image` plus `slide_id` and/or `features`")
        for row in reader:
            entry = {k: v for k, v in row.items() if k in ("slide_id", "features") and v}
            out[row["image"]] = entry
            out.setdefault(normalize_slide_id(row["image"]), entry)
    return out


def validate_record(rec: Any) -> str | None:
    """Why a record is malformed, or None when it is usable."""
    if not isinstance(rec, dict):
        return "record is not an object"
    image = rec.get("image")
    if isinstance(image, list):
        if len(image) != 1 or not isinstance(image[0], str) or not image[0]:
            return "image must name exactly one slide"
    elif not isinstance(image, str) or not image:
        return "missing image"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        return "conversations must be a list of at least two turns"
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {i} is not {{from, value}}"
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            return f"turn {i} is from {turn.get('from')!r}, expected {expected!r} (turns must alternate human/gpt)"
    if len(conv) % 2:
        return "conversation ends with a human turn"
    if conv[0]["value"].count(IMAGE_TOKEN) != 1:
        return f"first human turn must contain {IMAGE_TOKEN} exactly once"
    if any(IMAGE_TOKEN in t["value"] for t in conv[1:]):
        return f"{IMAGE_TOKEN} outside the first human turn"
    if not all(t["value"].strip() for t in conv[1::2]):
        return "empty assistant reply"
    return None


@dataclass
class AssemblyReport:
    """What `assemble` kept and dropped (the manifest's content)."""

    n_input: int = 0
    kept: list[dict] = field(default_factory=list)
    malformed: list[dict] = field(default_factory=list)
    missing_features: list[dict] = field(default_factory=list)
    leakage: list[dict] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "input": self.n_input,
            "kept": len(self.kept),
            "malformed": len(self.malformed),
            "missing_features": len(self.missing_features),
            "leakage_removed": len(self.leakage),
            "kept_slides": len({r["slide_id"] for r in self.kept}),
            "missing_slides": len({r["slide_id"] for r in self.missing_features}),
            "leakage_slides": len({r["slide_id"] for r in self.leakage}),
        }


def assemble(
    records: list[Any],
    features_dir: str | os.PathLike,
    benchmark_ids: set[str] | None = None,
    slide_map: dict[str, dict[str, str]] | None = None,
    leakage_level: str = "slide",
) -> AssemblyReport:
    """Validate records, attach `slide_id` and `features` (store path) to each kept one; never raises per record."""
    stores = index_feature_stores(features_dir)
    leak = {leak_key(s, leakage_level) for s in (benchmark_ids or set())}
    report = AssemblyReport(n_input=len(records))
    seen: Counter[str] = Counter()
    for i, rec in enumerate(records):
        rid = str(rec.get("id", f"#{i}")) if isinstance(rec, dict) else f"#{i}"
        why = validate_record(rec)
        if why:
            report.malformed.append({"id": rid, "reason": why})
            continue
        seen[rid] += 1
        if seen[rid] == 2:
            report.duplicate_ids.append(rid)
        image = rec["image"][0] if isinstance(rec["image"], list) else rec["image"]
        mapped = (slide_map or {}).get(image) or (slide_map or {}).get(normalize_slide_id(image)) or {}
        slide_id = mapped.get("slide_id") or normalize_slide_id(image)
        if leak_key(slide_id, leakage_level) in leak:
            report.leakage.append({"id": rid, "slide_id": slide_id})
            continue
        store = Path(mapped["features"]) if mapped.get("features") else stores.get(slide_id)
        if store is None or not store.exists():
            report.missing_features.append({"id": rid, "slide_id": slide_id})
            continue
        out = {"id": rid, "image": [image], "slide_id": slide_id, "features": str(store)}
        out["conversations"] = [{"from": t["from"], "value": t["value"]} for t in rec["conversations"]]
        report.kept.append(out)
    return report


@dataclass
class InstructionSettings:
    """Instruction assembly (config section `instructions`)."""

    leakage_level: str = setting(
        "slide", choices=["slide", "case"], help="case: also remove other slides of the same TCGA patient")


def build_instructions(
    inputs: list[str | os.PathLike] | str | os.PathLike,
    features_dir: str | os.PathLike,
    out: str | os.PathLike,
    exclude_benchmarks: Iterable[str | os.PathLike] = (),
    slide_map: str | os.PathLike | None = None,
    leakage_level: str = "slide",
) -> dict:
    """Assemble training JSON `out` and `<out stem>.manifest.json`; returns the manifest.

    A file that cannot be parsed at all is an error (it is an input of the DAG, not one bad record).
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    records: list[Any] = []
    input_info = []
    for p in inputs:
        data = json.loads(Path(p).read_text())
        if isinstance(data, dict):  # tolerate {"data": [...]} wrappers
            data = data.get("data", data.get("samples"))
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of SlideInstruction records")
        records.extend(data)
        input_info.append({"path": str(p), "sha256": sha256_file(p), "records": len(data)})
    bench_ids: set[str] = set()
    bench_info = []
    for b in exclude_benchmarks:
        ids = load_benchmark_slide_ids(b)
        bench_ids |= ids
        bench_info.append({"path": str(b), "sha256": sha256_file(b), "slides": len(ids)})
    mapping = load_slide_map(slide_map) if slide_map else None
    report = assemble(records, features_dir, bench_ids, mapping, leakage_level)

    out = Path(out)
    write_json(out, report.kept)
    manifest = {
        "output": str(out),
        "output_sha256": sha256_file(out),
        "inputs": input_info,
        "features_dir": str(features_dir),
        "slide_map": {"path": str(slide_map), "sha256": sha256_file(slide_map)} if slide_map else None,
        "exclude_benchmarks": bench_info,
        "leakage_level": leakage_level,
        "counts": report.counts(),
        "dropped": {
            "malformed": report.malformed,
            "missing_features": report.missing_features,
            "leakage": report.leakage,
        },
        "duplicate_ids": report.duplicate_ids,
    }
    write_json(manifest_path(out), manifest)
    return manifest


def manifest_path(out: str | os.PathLike) -> Path:
    """`OUT.json` -> `OUT.manifest.json`."""
    out = Path(out)
    return out.with_name(out.stem + ".manifest.json")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("slidechat build-instructions", __doc__,
                            "slidechat build-instructions --input vqa.json --features-dir F --out stage2.json "
                            "--exclude-benchmark bench.csv")
    parser.add_argument("--input", required=True, nargs="+", help="SlideInstruction JSON file(s)")
    parser.add_argument("--features-dir", required=True, help="folder of <slide_id>.zarr/.h5/.csv feature stores")
    parser.add_argument("--out", required=True, help="output training JSON (manifest written beside it)")
    parser.add_argument("--exclude-benchmark", nargs="*", default=[], metavar="FILE",
                        help="evaluation files (SlideBench CSV/JSON, MultiPathQA CSV, WSI-Bench JSON) whose slides are removed")
    parser.add_argument("--slide-map", help="CSV with columns image, slide_id and/or features (other naming schemes)")
    add_arguments(parser.add_argument_group("assembly (config section `instructions`)"), InstructionSettings)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = from_arguments(InstructionSettings, args)
    m = build_instructions(args.input, args.features_dir, args.out, args.exclude_benchmark, args.slide_map,
                           settings.leakage_level)
    c = m["counts"]
    print(f"{args.out}: kept {c['kept']}/{c['input']} records ({c['kept_slides']} slides); "
          f"dropped {c['malformed']} malformed, {c['missing_features']} without features "
          f"({c['missing_slides']} slides), {c['leakage_removed']} by the leakage guard ({c['leakage_slides']} slides)")
    for d in m["dropped"]["malformed"][:20]:
        print(f"  malformed {d['id']}: {d['reason']}")
    return 0
