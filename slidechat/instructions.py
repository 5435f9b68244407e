"""Instruction data assembly: SlideInstruction JSON -> training JSON tied to our feature stores.

Input records look like SlideChat's released SlideInstruction files::

    {"id": "train::0", "image": ["TCGA-A7-A0CJ-01Z-00-DX2.csv"],
     "conversations": [{"from": "human", "value": "...<image>"}, {"from": "gpt", "value": "..."}]}

Each record's image name is mapped to a slide id (the file stem, TCGA barcodes cut at the first dot, or an
explicit `--slide-map` CSV), and the slide id to a feature store in `--features-dir` (`<id>.zarr`, `<id>.h5`
or a released SlideChat `<id>.csv`, also one folder deep as in `TCGA_patch_feat/<TUMOR>/<id>.csv`), by the
one `FeatureStoreIndex` training and evaluation use too: slide ids are compared ignoring case.
Every store used is checked (our stores against their checksums); a damaged one stops the build, naming it.
Nothing crashes on one bad record: malformed records, records without features and records whose store
holds no patches (a slide without tissue) are dropped, counted and listed by id in `<out>.manifest.json`.
A build that keeps nothing, or loses more than `--max-missing-fraction` of its records for lack of
features, fails and names the slides. A leakage guard removes every slide (or, with
`leakage_level="case"`, every TCGA patient) that appears in an evaluation set.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from preprocessing.stores import (FeatureStoreIndex, SameFeatures, StoreError, count_patches, read_slide_map,
                                  read_store_attrs, slide_id_of_store, slide_key, tcga_barcode)
from slidechat.benchmarks_io import benchmark_slide_ids
from slidechat.model_card import SYNTHETIC_KEY
from slidechat.template import IMAGE_TOKEN
from wsicore.cli import command_parser
from wsicore.errors import InputError
from wsicore.files import read_json, sha256_file, write_json
from wsicore.settings import add_arguments, from_arguments, setting


@dataclass
class InstructionSettings:
    """Instruction assembly (config section `instructions`)."""

    leakage_level: str = setting(
        "slide", choices=["slide", "case"],
        help="'slide' removes evaluation slides; 'case' also removes other slides of the same TCGA patient")
    max_missing_fraction: float = setting(
        0.05, minimum=0, maximum=1,
        help="fail when more than this share of the records (well-formed, not removed by the leakage guard) has no "
             "feature store (slides without tissue are a listed skip, not counted here); 1 builds anyway")


def leak_key(slide_id: str, level: str = "slide") -> str:
    """Key compared by the leakage guard: the slide key (for a TCGA slide its barcode, whatever follows it), or
    for `level="case"` the TCGA patient (first 12 chars)."""
    key = slide_key(slide_id)
    if level == "case" and re.match(r"tcga-[a-z0-9]{2}-[a-z0-9]{4}", key):
        return key[:12]
    barcode = tcga_barcode(key)
    return barcode.casefold() if barcode else key


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
    no_patches: list[dict] = field(default_factory=list)  # the slide's store is empty (no tissue found)
    leakage: list[dict] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)
    damaged_stores: list[dict] = field(default_factory=list)  # {store, slide_id, error}: stop the build

    def counts(self) -> dict[str, int]:
        return {
            "input": self.n_input,
            "kept": len(self.kept),
            "malformed": len(self.malformed),
            "missing_features": len(self.missing_features),
            "no_patches": len(self.no_patches),
            "leakage_removed": len(self.leakage),
            "kept_slides": len({r["slide_id"] for r in self.kept}),
            "missing_slides": len({r["slide_id"] for r in self.missing_features}),
            "no_patches_slides": len({r["slide_id"] for r in self.no_patches}),
            "leakage_slides": len({r["slide_id"] for r in self.leakage}),
        }

    def unusable(self) -> list[dict]:
        """Records dropped because their slide has no usable features (no store, or an empty one)."""
        return self.missing_features + self.no_patches

    def missing_fraction(self) -> float:
        """Share of the records that needed features (well-formed, not removed for leakage) whose slide has no store.

        Empty stores (no tissue on the slide) are a recorded skip, not a mapping or extraction failure, so
        they are listed in the manifest but do not count here.
        """
        needed = len(self.kept) + len(self.unusable())
        return len(self.missing_features) / needed if needed else 0.0


def _check_stores(stores: Iterable[Path]) -> tuple[dict[Path, int], dict[Path, str]]:
    """Patches per store, and why the stores that fail their checks failed (read in parallel: mostly I/O)."""
    stores = sorted(set(stores))

    def check(p: Path) -> tuple[int | None, str | None]:
        try:
            return count_patches(p), None
        except StoreError as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(check, stores))
    counts = {p: n for p, (n, _) in zip(stores, results) if n is not None}
    return counts, {p: err for p, (_, err) in zip(stores, results) if err is not None}


def assemble(
    records: list[Any],
    index: FeatureStoreIndex,
    benchmark_ids: set[str] | None = None,
    leakage_level: str = "slide",
) -> AssemblyReport:
    """Validate records, attach `slide_id` and `features` (store path) to each kept one; never raises per record.

    Every store a record needs is checked once; damaged ones are listed in `damaged_stores`. Stores made
    differently (another encoder, checkpoint, transform or patch size) stop the assembly (`StoreError`).
    """
    leak = {leak_key(s, leakage_level) for s in (benchmark_ids or set())}
    report = AssemblyReport(n_input=len(records))
    seen: Counter[str] = Counter()
    found = []
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
        slide_id, store = index.resolve(image)
        if leak_key(slide_id, leakage_level) in leak:
            report.leakage.append({"id": rid, "slide_id": slide_id})
        elif store is None:
            report.missing_features.append({"id": rid, "slide_id": slide_id})
        else:
            found.append((rid, image, slide_id, store, rec))
    n_patches, damaged = _check_stores(store for *_, store, _ in found)
    report.damaged_stores = [{"store": str(p), "error": err} for p, err in damaged.items()]
    same = SameFeatures()  # one training set: features of one extraction
    attrs = {p: read_store_attrs(p) for p in sorted(n_patches)}
    for p, a in attrs.items():
        same.add(p, a)
    for rid, image, slide_id, store, rec in found:
        if store in damaged:
            continue
        # the store's own slide (its name, the id it records) is guarded too: a slide map may give an
        # evaluation slide's store another name
        if any(leak_key(s, leakage_level) in leak for s in (slide_id_of_store(store), attrs[store].get("slide_id"))
               if s):
            report.leakage.append({"id": rid, "slide_id": slide_id, "features": str(store)})
            continue
        if n_patches[store] == 0:
            report.no_patches.append({"id": rid, "slide_id": slide_id, "features": str(store)})
            continue
        out = {"id": rid, "image": [image], "slide_id": slide_id, "features": str(store)}
        out["conversations"] = [{"from": t["from"], "value": t["value"]} for t in rec["conversations"]]
        if rec.get(SYNTHETIC_KEY) is True:  # the demo's mark travels on, into the model card
            out[SYNTHETIC_KEY] = True
        report.kept.append(out)
    return report


def _read_records(path: str | os.PathLike) -> list[Any]:
    data = read_json(path, "SlideInstruction JSON", "--input")
    if isinstance(data, dict):  # tolerate {"data": [...]} wrappers
        data = data.get("data", data.get("samples"))
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of SlideInstruction records (option --input)")
    return data


def _listed(slides: Iterable[str], limit: int = 20) -> str:
    slides = sorted(set(slides))
    return ", ".join(slides[:limit]) + (f" and {len(slides) - limit} more" if len(slides) > limit else "")


def _refuse_losses(report: AssemblyReport, out: Path, settings: InstructionSettings) -> None:
    """A damaged store, a build that keeps nothing, or one losing too many records is an error."""
    if report.damaged_stores:
        first = report.damaged_stores[0]["error"]
        raise StoreError(f"{len(report.damaged_stores)} feature store(s) failed their check: "
                         f"{_listed(d['store'] for d in report.damaged_stores)}. First: {first}")
    c = report.counts()
    if not report.kept:
        raise InputError(f"{out}: no record kept out of {c['input']} ({c['malformed']} malformed, "
                         f"{c['missing_features']} without a feature store, {c['no_patches']} with an empty store, "
                         f"{c['leakage_removed']} removed by the leakage guard); check --features-dir and --slide-map "
                         f"(slides looked for: {_listed(r['slide_id'] for r in report.unusable())})")
    if report.missing_fraction() > settings.max_missing_fraction:
        raise InputError(
            f"{out}: {len(report.missing_features)} record(s) ({100 * report.missing_fraction():.1f}%, more than "
            f"--max-missing-fraction {settings.max_missing_fraction:g}) have no feature store; slides without a "
            f"store: {_listed(r['slide_id'] for r in report.missing_features)}. Extract them, fix "
            f"--slide-map, or raise --max-missing-fraction (1 builds anyway)")


def build_instructions(
    inputs: list[str | os.PathLike] | str | os.PathLike,
    features_dir: str | os.PathLike,
    out: str | os.PathLike,
    exclude_benchmarks: Iterable[str | os.PathLike] = (),
    slide_map: str | os.PathLike | None = None,
    settings: InstructionSettings | None = None,
) -> dict:
    """Assemble training JSON `out` and `<out stem>.manifest.json`; returns the manifest.

    A file that cannot be parsed at all is an error (it is an input of the DAG, not one bad record), and so
    are a damaged store, a build that keeps nothing and one that loses too many records (`settings`).
    """
    settings = settings or InstructionSettings()
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    records: list[Any] = []
    input_info = []
    for p in inputs:
        data = _read_records(p)
        records.extend(data)
        input_info.append({"path": str(p), "sha256": sha256_file(p), "records": len(data)})
    bench_ids: set[str] = set()
    bench_info = []
    for b in exclude_benchmarks:
        if not Path(b).exists():
            raise InputError(f"benchmark to exclude not found: {b} (option --exclude-benchmark)")
        try:
            ids = benchmark_slide_ids(b)
        except InputError as exc:
            raise InputError(f"{exc} (option --exclude-benchmark)") from exc
        bench_ids |= ids
        bench_info.append({"path": str(b), "sha256": _sha256(b), "slides": len(ids)})
    index = FeatureStoreIndex(features_dir, read_slide_map(slide_map) if slide_map else None)
    report = assemble(records, index, bench_ids, settings.leakage_level)
    out = Path(out)
    _refuse_losses(report, out, settings)

    write_json(out, report.kept)
    manifest = {
        "output": str(out),
        "output_sha256": sha256_file(out),
        "inputs": input_info,
        "features_dir": str(features_dir),
        "slide_map": {"path": str(slide_map), "sha256": sha256_file(slide_map)} if slide_map else None,
        "exclude_benchmarks": bench_info,
        "leakage_level": settings.leakage_level,
        "settings": asdict(settings),
        "counts": report.counts(),
        "missing_fraction": report.missing_fraction(),
        "dropped": {
            "malformed": report.malformed,
            "missing_features": report.missing_features,
            "no_patches": report.no_patches,
            "leakage": report.leakage,
        },
        "duplicate_ids": report.duplicate_ids,
    }
    write_json(manifest_path(out), manifest)
    return manifest


def _sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a WSI-Bench folder: of its JSON files' names and hashes."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    listing = "".join(f"{f.name}\t{sha256_file(f)}\n" for f in sorted(path.glob("*.json")))
    return hashlib.sha256(listing.encode()).hexdigest()


def manifest_path(out: str | os.PathLike) -> Path:
    """`OUT.json` -> `OUT.manifest.json`."""
    out = Path(out)
    return out.with_name(out.stem + ".manifest.json")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("slidechat build-instructions", __doc__,
                            "slidechat build-instructions --input vqa.json --features-dir results/features/conch_v1 "
                            "--out stage2.json --exclude-benchmark SlideBench-VQA-TCGA.csv")
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
    m = build_instructions(args.input, args.features_dir, args.out, args.exclude_benchmark, args.slide_map, settings)
    c = m["counts"]
    print(f"{args.out}: kept {c['kept']}/{c['input']} records ({c['kept_slides']} slides); "
          f"dropped {c['malformed']} malformed, {c['missing_features']} without features "
          f"({c['missing_slides']} slides), {c['no_patches']} with an empty store ({c['no_patches_slides']} slides), "
          f"{c['leakage_removed']} by the leakage guard ({c['leakage_slides']} slides)")
    for d in m["dropped"]["malformed"][:20]:
        print(f"  malformed {d['id']}: {d['reason']}")
    return 0
