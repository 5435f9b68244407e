"""Per-rule timing table from Snakemake `benchmark:` files: `python -m slidechat.timing results/benchmarks`."""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path


def collect(bench_dir: str | Path) -> dict[str, list[tuple[float, float]]]:
    """rule name -> [(seconds, max_rss MB)] for every benchmark TSV below `bench_dir`.

    The rule is the first path component under `bench_dir` (per-slide files live in `<rule>/<slide>.tsv`).
    """
    bench_dir = Path(bench_dir)
    table: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for tsv in sorted(bench_dir.rglob("*.tsv")):
        rel = tsv.relative_to(bench_dir)
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        with open(tsv, newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                try:
                    rss = float(row.get("max_rss") or "nan")
                except ValueError:
                    rss = float("nan")
                table[rule].append((float(row["s"]), rss))
    return dict(table)


def format_table(table: dict[str, list[tuple[float, float]]]) -> str:
    lines = [f"{'rule':<26} {'jobs':>5} {'total s':>9} {'max s':>8} {'max RSS MB':>11}"]
    total = 0.0
    for rule, rows in sorted(table.items(), key=lambda kv: -sum(r[0] for r in kv[1])):
        secs = [r[0] for r in rows]
        total += sum(secs)
        rss = max((r[1] for r in rows), default=float("nan"))
        lines.append(f"{rule:<26} {len(rows):>5} {sum(secs):>9.1f} {max(secs):>8.1f} {rss:>11.0f}")
    lines.append(f"{'sum of job times':<26} {'':>5} {total:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_dir = argv[0] if argv else "results/benchmarks"
    table = collect(bench_dir)
    if not table:
        print(f"no benchmark files under {bench_dir}")
        return 0
    print("Per-rule timing (from Snakemake benchmark files):")
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
