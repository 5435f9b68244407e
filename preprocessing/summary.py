"""Per-slide table for the report: pixel size, tissue area, patch count, feature-extraction time and throughput.

Written as a TSV (`--out`, for scripts) and as an HTML page (`--html`, shown in the Snakemake report). Slides
are the ones with a tiling summary in --patch-dir; what a slide lacks (no segmentation summary, no store,
no benchmark record) is left blank, so the table can be made from a partial run.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from wsicore.cli import command_parser
from wsicore.errors import InputError
from wsicore.files import write_text

COLUMNS = {  # key: header in the HTML page
    "slide": "slide", "status": "status", "mpp": "µm/px (level 0)", "tissue_mm2": "tissue (mm²)",
    "tissue_regions": "tissue regions", "patches": "patches", "patch": "patch", "read_level": "read level",
    "extract_s": "extraction (s)", "patches_per_s": "patches/s", "store": "feature store",
}


def _benchmark_seconds(path: Path) -> float | None:
    if not path.exists():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return float(rows[-1]["s"]) if rows else None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); rerun the job that writes it") from exc


def slide_rows(seg_dir: Path, patch_dir: Path, features_dir: Path, bench_dir: Path) -> list[dict]:
    """One row per slide that has a tiling summary."""
    rows = []
    for tiling_json in sorted(patch_dir.glob("*_tiling.json")):
        tiling = _json(tiling_json)
        slide = tiling["slide_id"]
        seg_json = seg_dir / f"{slide}_segmentation.json"
        seg = _json(seg_json) if seg_json.exists() else {}
        seconds = _benchmark_seconds(bench_dir / "extract_features" / f"{slide}.tsv")
        n = int(tiling["n_patches"])
        stores = [p for p in (features_dir / f"{slide}.zarr", features_dir / f"{slide}.h5") if p.exists()]
        params = tiling.get("params", {})
        rows.append(
            {
                "slide": slide,
                "status": tiling["status"],
                "mpp": round(float(tiling["mpp_level0"][0]), 4) if tiling.get("mpp_level0") else "",
                "tissue_mm2": round(float(seg["tissue_area_mm2"]), 3) if "tissue_area_mm2" in seg else "",
                "tissue_regions": seg.get("n_tissue_regions", ""),
                "patches": n,
                "patch": f"{params.get('patch_size', '?')} px at {params.get('target_mpp', '?')} µm/px",
                "read_level": tiling["read_level"],
                "extract_s": round(seconds, 1) if seconds is not None else "",
                "patches_per_s": round(n / seconds, 1) if seconds else "",
                "store": stores[0].name if stores else "",
            }
        )
    return rows


def totals(rows: list[dict]) -> str:
    """One line over all slides: slides, patches, tissue, extraction time and throughput."""
    if not rows:
        return "no slide has been tiled yet"
    n_patches = sum(r["patches"] for r in rows)
    tissue = sum(r["tissue_mm2"] for r in rows if r["tissue_mm2"] != "")
    seconds = sum(r["extract_s"] for r in rows if r["extract_s"] != "")
    empty = sum(r["patches"] == 0 for r in rows)
    line = f"{len(rows)} slides, {n_patches:,} patches, {tissue:,.1f} mm² of tissue"
    if empty:
        line += f", {empty} slide(s) without patches"
    if seconds:
        line += (f"; extraction {seconds:,.1f} s of job time ({n_patches / seconds:,.1f} patches/s including "
                 "process start-up)")
    return line


def to_tsv(rows: list[dict]) -> str:
    if not rows:
        return "slide\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    buf.write(f"# {totals(rows)}\n")
    return buf.getvalue()


def to_html(rows: list[dict]) -> str:
    """A self-contained page: the totals line, then the table (slides without patches highlighted)."""
    head = "".join(f"<th>{html.escape(COLUMNS[k])}</th>" for k in COLUMNS)
    body = []
    for r in rows:
        cells = "".join(f"<td{' class=num' if isinstance(r[k], (int, float)) else ''}>{html.escape(str(r[k]))}</td>"
                        for k in COLUMNS)
        body.append(f"<tr{' class=empty' if r['patches'] == 0 else ''}>{cells}</tr>")
    style = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:14px}"
             "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;white-space:nowrap}td.num{text-align:right}"
             "th{background:#f3f3f3;position:sticky;top:0}tr.empty{background:#fee}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>Slides</title><style>{style}</style></head>"
            f"<body>\n<h2>Slides: tissue, patches and feature extraction</h2>\n<p>{html.escape(totals(rows))}</p>\n"
            f"<table>\n<tr>{head}</tr>\n" + "\n".join(body) + "\n</table>\n</body></html>\n")


def main(argv: list[str]) -> int:
    parser = command_parser("python -m preprocessing summary", __doc__,
                            "python -m preprocessing summary --seg-dir results/segmentation --patch-dir results/patches "
                            "--features-dir results/features/SET --bench-dir results/benchmarks "
                            "--out results/summary/slides.tsv --html results/summary/slides.html")
    parser.add_argument("--seg-dir", type=Path, required=True, help="segmentation folder (<slide>_segmentation.json)")
    parser.add_argument("--patch-dir", type=Path, required=True, help="tiling folder (<slide>_tiling.json)")
    parser.add_argument("--features-dir", type=Path, required=True, help="folder of the slides' feature stores")
    parser.add_argument("--bench-dir", type=Path, required=True,
                        help="Snakemake benchmark folder (extraction times: extract_features/<slide>.tsv)")
    parser.add_argument("--out", type=Path, required=True, help="TSV to write")
    parser.add_argument("--html", type=Path, default=None, help="also write the table as an HTML page")
    args = parser.parse_args(argv)
    if not args.patch_dir.is_dir():
        raise InputError(f"tiling folder not found: {args.patch_dir} (option --patch-dir)")
    rows = slide_rows(args.seg_dir, args.patch_dir, args.features_dir, args.bench_dir)
    write_text(args.out, to_tsv(rows))
    if args.html:
        write_text(args.html, to_html(rows))
    print(f"{len(rows)} slides -> {args.out}")
    return 0
