"""Human reports from ``metrics.json``: ``report.md``, a self-contained ``report.html`` and a per-category
bar chart ``category_accuracy.png`` (accuracy beside the answer-prior baselines)."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from wsicore.cli import command_parser
from wsicore.errors import InputError
from wsicore.files import atomic_path, output_folder, read_json, write_text


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}"


def plot_category_accuracy(metrics: dict[str, Any], out_png: str | os.PathLike) -> Path:
    """Horizontal bars: accuracy per narrow category, its majority-letter baseline as a tick, overall lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = metrics.get("per_narrow_category") or {}
    out_png = Path(out_png)
    if cats:
        names = list(cats)
        acc = [100 * (cats[c]["accuracy"] or 0.0) for c in names]
        base = [100 * (cats[c]["majority_letter_accuracy"] or 0.0) for c in names]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6))
        y = range(len(names))
        ax.barh(y, acc, color="#4C72B0", label="model")
        ax.scatter(base, y, marker="|", s=250, color="#C44E52", zorder=3, label="majority letter (category)")
        b = metrics.get("baselines") or {}
        if metrics.get("accuracy") is not None:
            ax.axvline(100 * metrics["accuracy"], color="#4C72B0", ls="--", lw=1, label="overall")
        if b.get("most_frequent_letter"):
            ax.axvline(100 * b["most_frequent_letter"]["accuracy"], color="#C44E52", ls=":", lw=1,
                       label=f"always '{b['most_frequent_letter']['letter']}'")
        if b.get("random"):
            ax.axvline(100 * b["random"], color="grey", ls=":", lw=1, label="random")
        ax.set_yticks(list(y), [f"{c} (n={cats[c]['n']})" for c in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy, unanswered = wrong (%)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6 / (0.45 * len(names) + 1.6)), ncol=5,
                  frameon=False)
    else:  # caption-only benchmark: corpus metrics
        corpus = (metrics.get("captions") or {}).get("corpus") or {}
        items = [(k, v) for k, v in corpus.items() if v is not None]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([k for k, _ in items], [v for _, v in items], color="#4C72B0")
        ax.set_ylabel("score (0-100)")
    ax.set_title(Path(str(metrics.get("benchmark", ""))).name or "benchmark", fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _group_rows(groups: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [[k, str(v["n"]), str(v["n_answered"]), _pct(v["accuracy"]), _pct(v["majority_letter_accuracy"]),
             str(v["unparsable"])] for k, v in groups.items()]


def render_markdown(metrics: dict[str, Any], png_name: str | None = "category_accuracy.png") -> str:
    """The Markdown report (also the source of the HTML one)."""
    name = Path(str(metrics.get("benchmark", "benchmark"))).name
    lines = [f"# Evaluation: {name}", ""]
    s = metrics.get("settings") or {}
    if s:
        lines += ["Settings: " + ", ".join(f"`{k}`={v}" for k, v in s.items()), ""]
    leak = metrics.get("leakage") or {}
    if leak.get("n_overlap"):
        lines += [f"> **Warning: leakage.** {leak['n_overlap']} of {leak['n_eval_slides']} evaluation slides "
                  f"({leak['n_questions_on_overlap']} questions) also appear in the training data: "
                  + ", ".join(leak["slides"][:20]) + (" …" if leak["n_overlap"] > 20 else ""), ""]
    elif leak.get("checked"):
        lines += ["Leakage check: no evaluation slide appears in the training data.", ""]
    else:
        lines += ["Leakage check: not run (no training manifest given).", ""]
    if metrics.get("n"):
        b = metrics["baselines"]
        mfl, pcm = b["most_frequent_letter"], b["per_category_majority"]
        lines += ["## Multiple choice", "",
                  _table(["", "value"], [
                      ["accuracy (all, unanswered = wrong)",
                       f"{_pct(metrics['accuracy'])} (95% CI {_ci(metrics['accuracy_ci95'])})"],
                      ["accuracy (answered only)", _pct(metrics.get("accuracy_answered"))],
                      ["questions", str(metrics["n"])],
                      ["answered", str(metrics["n_answered"])],
                      ["skipped: slide has no features", str(metrics["n_skipped_no_features"])],
                      ["skipped: store holds no patches", str(metrics.get("n_skipped_no_patches", 0))],
                      ["no output", str(metrics.get("n_missing_output", 0))],
                      ["left out: answer not among the choices", str(metrics.get("n_answer_not_in_choices", 0))],
                      ["unparsable answers", f"{metrics['unparsable']} ({_pct(metrics['unparsable_rate'])})"],
                      ["baseline: uniform random", _pct(b["random"])],
                      [f"baseline: always '{mfl['letter']}'", _pct(mfl["accuracy"])],
                      ["baseline: per-category majority letter", _pct(pcm["accuracy"])],
                      ["margin over the most frequent letter",
                       "n/a" if metrics.get("margin_over_majority") is None else
                       f"{metrics['margin_over_majority']:+.1f} points"],
                  ]), "",
                  "Multiple-choice benchmarks here are letter-skewed: a model is only interesting above the "
                  "baselines. Accuracy counts unanswered and unparsable answers as wrong.", ""]
        if png_name:
            lines += [f"![accuracy per category]({png_name})", ""]
        headers = ["category", "n", "answered", "accuracy", "majority letter", "unparsable"]
        lines += ["### Per broad category", "", _table(headers, _group_rows(metrics["per_broad_category"])), ""]
        lines += ["### Per narrow category", "", _table(headers, _group_rows(metrics["per_narrow_category"])), ""]
        gname = metrics.get("group_name", "group")
        groups = metrics.get(f"per_{gname}") or {}
        if groups:
            lines += [f"### Per {gname}", "", _table([gname] + headers[1:], _group_rows(groups)), ""]
    cap = metrics.get("captions")
    if cap:
        c = cap["corpus"]
        lines += ["## Open-ended / captions", "",
                  f"{cap['n_answered']} of {cap['n']} answered; {cap['n_skipped_no_features']} skipped (no features).",
                  "", _table(list(c), [["n/a" if v is None else f"{v:.2f}" for v in c.values()]]), "",
                  cap.get("notes", ""), ""]
        if cap.get("per_task"):
            keys = ["bleu1", "bleu4", "rougeL", "meteor"]
            lines += [_table(["task", "n"] + keys, [[k, str(v["n"])] + [f"{v[m]:.2f}" for m in keys]
                                                    for k, v in cap["per_task"].items()]), ""]
    return "\n".join(lines)


def _md_to_html(md: str, png_b64: str | None, png_name: str) -> str:
    """Tiny converter for the subset of Markdown that `render_markdown` writes (headings, tables, notes)."""
    body: list[str] = []
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()).replace("`", "") for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            if png_b64:
                body.append(f'<img alt="accuracy per category" src="data:image/png;base64,{png_b64}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("> "):
            body.append(f'<p class="warn">{html.escape(line[2:]).replace("**", "")}</p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.warn{background:#fee;padding:.5em}"
             "img{max-width:100%}")
    return f"<!doctype html>\n<html><head><meta charset='utf-8'><title>Evaluation</title><style>{style}</style>" \
           f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n"


def write_report(metrics: dict[str, Any] | str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``category_accuracy.png`` into `out_dir`; returns their paths."""
    if not isinstance(metrics, dict):
        path = metrics
        metrics = read_json(path, "metrics.json of `slidechat evaluate` or `score`", "--metrics")
        if not isinstance(metrics, dict) or "benchmark" not in metrics:
            raise InputError(f"{path}: not a metrics.json written by `slidechat evaluate` or `score` (option --metrics)")
    out = output_folder(out_dir, "--out-dir")
    png = plot_category_accuracy(metrics, out / "category_accuracy.png")
    md = render_markdown(metrics, png.name)
    write_text(out / "report.md", md + "\n")
    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    write_text(out / "report.html", _md_to_html(md, b64, png.name))
    return {"markdown": out / "report.md", "html": out / "report.html", "png": png}


def main(argv: list[str]) -> int:
    """`slidechat report --metrics metrics.json --out-dir DIR`."""
    p = command_parser("slidechat report", __doc__, "slidechat report --metrics results/eval/demo_slidebench/metrics.json")
    p.add_argument("--metrics", required=True, help="metrics.json written by `slidechat evaluate` or `score`")
    p.add_argument("--out-dir", default=None, help="where to write the report (default: beside metrics.json)")
    a = p.parse_args(argv)
    paths = write_report(a.metrics, a.out_dir or Path(a.metrics).parent)
    print(paths["markdown"])
    return 0
