"""Per-slide table for the report: tissue area, patch count, feature-extraction time and throughput.

`python -m preprocessing summary --seg-dir S --patch-dir P --features-dir F --bench-dir B --out table.tsv`
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from wsicore.files import write_text


def _benchmark_seconds(path: Path) -> float | None:
    if not path.exists():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return float(rows[-1]["s"]) if rows else None


def slide_rows(seg_dir: Path, patch_dir: Path, features_dir: Path, bench_dir: Path) -> list[dict]:
    """One row per slide that has a tiling summary."""
    rows = []
    for tiling_json in sorted(patch_dir.glob("*_tiling.json")):
        tiling = json.loads(tiling_json.read_text())
        slide = tiling["slide_id"]
        seg_json = seg_dir / f"{slide}_segmentation.json"
        seg = json.loads(seg_json.read_text()) if seg_json.exists() else {}
        seconds = _benchmark_seconds(bench_dir / "extract_features" / f"{slide}.tsv")
        n = int(tiling["n_patches"])
        stores = [p for p in (features_dir / f"{slide}.zarr", features_dir / f"{slide}.h5") if p.exists()]
        rows.append(
            {
                "slide": slide,
                "status": tiling["status"],
                "tissue_mm2": round(float(seg.get("tissue_area_mm2", float("nan"))), 3),
                "patches": n,
                "read_level": tiling["read_level"],
                "read_size_px": tiling["read_size"],
                "extract_s": round(seconds, 1) if seconds is not None else "",
                "patches_per_s": round(n / seconds, 1) if seconds else "",
                "store": stores[0].name if stores else "",
            }
        )
    return rows


def to_tsv(rows: list[dict]) -> str:
    if not rows:
        return "slide\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    total_patches = sum(r["patches"] for r in rows)
    total_s = sum(r["extract_s"] for r in rows if r["extract_s"] != "")
    if total_s:
        buf.write(f"# all slides: {total_patches} patches, extraction {total_s:.1f} s of job time "
                  f"({total_patches / total_s:.1f} patches/s including process start-up)\n")
    return buf.getvalue()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocessing summary", description=__doc__)
    parser.add_argument("--seg-dir", type=Path, required=True)
    parser.add_argument("--patch-dir", type=Path, required=True)
    parser.add_argument("--features-dir", type=Path, required=True)
    parser.add_argument("--bench-dir", type=Path, required=True, help="Snakemake benchmark folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = slide_rows(args.seg_dir, args.patch_dir, args.features_dir, args.bench_dir)
    write_text(args.out, to_tsv(rows))
    print(f"{len(rows)} slides -> {args.out}")
    return 0
