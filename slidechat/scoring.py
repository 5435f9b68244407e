"""Scoring of benchmark outputs: answer-letter extraction, accuracy with CIs, answer-prior baselines,
caption metrics and the leakage check. ``slidechat score`` runs it on any outputs CSV, including ones
made by the original SlideChat test tool (columns ``ID`` ... ``Output``).

Conventions in ``metrics.json``: accuracies are fractions in [0, 1]; ``margin_over_majority`` is in
percentage points. Caption metrics are on a 0-100 scale (as usually reported).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from slidechat.benchmarks_io import (
    Benchmark,
    BenchItem,
    BenchmarkFormatError,
    benchmark_slide_ids,
    load_benchmark,
    match_outputs,
    read_outputs_csv,
    skipped_in_outputs,
)
from slidechat.instructions import leak_key
from wsicore.cli import command_parser
from wsicore.errors import UsageError
from wsicore.files import read_json, write_json

# ------------------------------------------------------------------------------------- letter extractor

_SPECIAL_TOKENS = re.compile(r"<\|[^|>]*\|>|</?s>")


def _label_alt(labels: Sequence[str]) -> str:
    return "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))


def extract_answer(text: str | None, options: dict[str, str]) -> str | None:
    """The option label a free-text answer picks, or None when it cannot be told (deterministic).

    Rules, first hit wins: the label alone (``B``, ``B.``, ``(B)``, ``**B**``); a boxed label
    (``\\boxed{B}``); ``Answer: B`` / ``the answer is (B)`` / ``option B``; bold labels; a reply that
    starts with the label followed by punctuation (``B. Small cell ...``, ``B) ...``); otherwise the text
    of exactly one option (longest match wins when one option's text is inside another's).
    """
    if text is None or not options:
        return None
    labels = list(options)
    s = _SPECIAL_TOKENS.sub(" ", str(text)).strip()
    if not s:
        return None
    alt = _label_alt(labels)
    flags = re.IGNORECASE if all(len(x) > 1 for x in labels) else 0

    def canon(found: str) -> str | None:
        for lab in labels:
            if found.lower() == lab.lower():
                return lab
        return None

    # 1. the label alone, maybe wrapped in brackets, bold, quotes or followed by a full stop
    m = re.fullmatch(rf"[\s\(\[\*\"'`]*({alt})[\s\)\]\*\"'`\.:]*", s, re.IGNORECASE)
    if m:
        return canon(m.group(1))
    # 2. boxed
    m = re.search(rf"\\boxed\{{\s*(?:\(\s*)?({alt})(?:\s*\))?[\.\s]*\}}", s, re.IGNORECASE)
    if m:
        return canon(m.group(1))
    # 3. explicit "answer is B" / "Answer: (B)" statements; then "option B". A bare letter must be upper
    #    case here, so that "answer: a poorly differentiated ..." is not read as A.
    # each whitespace run is matched by one quantifier only: `\s*x?\s*` backtracks cubically on long runs
    sep = r"(?i:\s*(?:(?:is|would\s+be|should\s+be)\s*)?(?:[:\-]\s*)?)[\*\"'`]*"
    for kw in (r"(?i:final\s+answer|correct\s+answer|answer)", r"(?i:correct\s+option|correct\s+choice|option|choice)"):
        for pat in (rf"{kw}{sep}\(\s*(?i:({alt}))\s*\)", rf"{kw}{sep}({alt})(?![\w-])"):
            m = re.search(pat, s, flags)
            if m and canon(m.group(1)):
                return canon(m.group(1))
    # 4. bold label somewhere: **B** or **B.** or **(B)**
    bold = {canon(x) for x in re.findall(rf"\*\*\s*\(?({alt})\)?[\.\):]?\s*\*\*", s, flags)} - {None}
    if len(bold) == 1:
        return bold.pop()
    # 5. the reply starts with the label followed by punctuation / end of line: "B. text", "(B) text", "B)"
    punct = r"[\.\):\]]" if not flags else r"[\.\):\],!;]"
    m = re.match(rf"[\s\(\[\*\"'`]*({alt})(?:\s*{punct}|\s*\n|\s*$)", s, flags)
    if m:
        return canon(m.group(1))
    # 6. the text of exactly one option
    return _match_option_text(s, options)


def _match_option_text(s: str, options: dict[str, str]) -> str | None:
    spans: dict[str, list[tuple[int, int]]] = {}
    low = s.lower()
    for lab, txt in options.items():
        t = (txt or "").strip().rstrip(".").lower()
        if not t:
            continue
        found = [(m.start(), m.end()) for m in re.finditer(rf"(?<!\w){re.escape(t)}(?!\w)", low)]
        if found:
            spans[lab] = found
    # an option found only inside another found option's text does not count ("adenocarcinoma" inside
    # "papillary adenocarcinoma")
    keep = []
    for lab, sp in spans.items():
        others = [o for k, v in spans.items() if k != lab for o in v]
        if any(not any(o[0] <= a and b <= o[1] and (o[1] - o[0]) > (b - a) for o in others) for a, b in sp):
            keep.append(lab)
    return keep[0] if len(keep) == 1 else None


# ------------------------------------------------------------------------------------------- accuracy


def bootstrap_ci(correct: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of the mean of a 0/1 vector (resampling questions); None when empty."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def _category_key(it: BenchItem) -> str:
    return it.narrow_category or it.broad_category or it.group or "all"


def answer_prior_baselines(items: Sequence[BenchItem]) -> dict[str, Any]:
    """Accuracies reachable without looking at the slide, computed from the benchmark's own answers."""
    items = [it for it in items if it.is_choice and it.answer is not None]
    n = len(items)
    if n == 0:
        return {"random": None, "most_frequent_letter": None, "per_category_majority": None}
    counts = Counter(it.answer for it in items)
    letter, top = max(sorted(counts.items()), key=lambda kv: kv[1])  # ties: alphabetically first
    by_cat: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        by_cat[_category_key(it)][it.answer] += 1
    majority = {c: max(sorted(cnt.items()), key=lambda kv: kv[1])[0] for c, cnt in by_cat.items()}
    return {
        "random": float(np.mean([1.0 / len(it.options) for it in items])),
        "most_frequent_letter": {"letter": letter, "accuracy": top / n,
                                 "letter_shares": {k: v / n for k, v in sorted(counts.items())}},
        "per_category_majority": {"accuracy": sum(max(c.values()) for c in by_cat.values()) / n,
                                  "letters": dict(sorted(majority.items()))},
    }


def _group_stats(items: Sequence[BenchItem], preds: dict[str, str | None], answered: set[str],
                 key: Callable[[BenchItem], str | None]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[BenchItem]] = defaultdict(list)
    for it in items:
        k = key(it)
        if k is not None:
            groups[k].append(it)
    out = {}
    for k in sorted(groups):
        g = groups[k]
        ans = [it for it in g if it.qid in answered]
        correct = sum(preds.get(it.qid) == it.answer for it in ans)
        out[k] = {
            "n": len(g), "n_answered": len(ans), "correct": int(correct),
            "accuracy": correct / len(g), "accuracy_answered": correct / len(ans) if ans else None,
            "unparsable": sum(preds.get(it.qid) is None for it in ans),
            "majority_letter_accuracy": answer_prior_baselines(g)["most_frequent_letter"]["accuracy"],
        }
    return out


def score_choice(bench: Benchmark | Sequence[BenchItem], raw_outputs: dict[str, str | None],
                 skipped: dict[str, str] | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics for the closed questions: overall / per-category / per-group accuracy, CI and baselines.

    `skipped` maps question ids the evaluator did not ask to why (`no_features`, `no_patches`). The headline
    `accuracy` is over every scorable question: skipped ones, ones missing from the outputs and unparsable
    answers count as wrong. `accuracy_answered` is over the questions with an output (the figure the original
    test tool prints when every question has one). Items whose answer is not among their choices cannot be
    scored; they are left out and listed in `answer_not_in_choices`.
    """
    all_items = bench.choice_items if isinstance(bench, Benchmark) else [it for it in bench if it.is_choice]
    group_name = bench.group_name if isinstance(bench, Benchmark) else "group"
    skipped = dict(skipped or {})
    items = [it for it in all_items if it.answer in it.options]
    not_scorable = [{"id": it.qid, "answer": it.row.get("Answer"), "choices": list(it.options)}
                    for it in all_items if it.answer not in it.options]
    preds = {it.qid: extract_answer(raw_outputs.get(it.qid), it.options) for it in items}
    answered = {it.qid for it in items if raw_outputs.get(it.qid) is not None and it.qid not in skipped}
    correct_all = [float(it.qid in answered and preds[it.qid] == it.answer) for it in items]
    correct_ans = [c for it, c in zip(items, correct_all) if it.qid in answered]
    n, n_ans = len(items), len(correct_ans)
    unparsable = sum(preds[it.qid] is None for it in items if it.qid in answered)
    acc = float(np.mean(correct_all)) if n else None
    base_all = answer_prior_baselines(items)
    mfl = base_all["most_frequent_letter"]
    status = Counter(skipped.get(it.qid) for it in items)
    metrics: dict[str, Any] = {
        "n": n,
        "n_answered": n_ans,
        "n_skipped_no_features": status["no_features"],
        "n_skipped_no_patches": status["no_patches"],
        "n_missing_output": sum(it.qid not in answered and it.qid not in skipped for it in items),
        "n_answer_not_in_choices": len(not_scorable),
        "answer_not_in_choices": not_scorable,
        "correct": int(sum(correct_all)),
        "accuracy": acc,
        "accuracy_ci95": bootstrap_ci(correct_all, n_boot=n_boot, seed=seed),
        "accuracy_answered": float(np.mean(correct_ans)) if n_ans else None,
        "accuracy_answered_ci95": bootstrap_ci(correct_ans, n_boot=n_boot, seed=seed),
        "unparsable": int(unparsable),
        "unparsable_rate": unparsable / n_ans if n_ans else None,
        "prediction_counts": dict(sorted(Counter(p or "unparsable" for q, p in preds.items() if q in answered).items())),
        "baselines": base_all,
        "baselines_answered": answer_prior_baselines([it for it in items if it.qid in answered]),
        "margin_over_majority": (100.0 * (acc - mfl["accuracy"])) if (acc is not None and mfl) else None,
        "per_broad_category": _group_stats(items, preds, answered, lambda it: it.broad_category),
        "per_narrow_category": _group_stats(items, preds, answered, lambda it: it.narrow_category),
    }
    per_group = _group_stats(items, preds, answered, lambda it: it.group)
    metrics[f"per_{group_name}"] = per_group
    if group_name == "tumor":
        metrics.setdefault("per_task", {})
    elif group_name == "task":
        metrics.setdefault("per_tumor", {})
    metrics["predictions"] = preds
    return metrics


# --------------------------------------------------------------------------------------------- captions


class _NoSynonyms:
    """Stands in for WordNet in nltk's METEOR when the WordNet data is not installed: no synonym matches.

    Downloading WordNet at run time is not allowed; with this, METEOR uses exact and Porter-stem matching.
    """

    def synsets(self, word: str, *args: Any, **kwargs: Any) -> list:
        return []


def _wordnet() -> tuple[Any, bool]:
    """nltk's WordNet reader when its data is installed locally, else a no-synonym stand-in (never downloads)."""
    try:
        import nltk

        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet

        wordnet.synsets("test")
        return wordnet, True
    except LookupError:
        return _NoSynonyms(), False
    except Exception:  # corrupt/partial data: behave as absent
        return _NoSynonyms(), False


_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word / punctuation tokens (no model data needed, unlike nltk.word_tokenize)."""
    return _TOKEN.findall(text.lower())


def caption_metrics(references: Sequence[str], hypotheses: Sequence[str], ids: Sequence[str] | None = None,
                    judge: Callable[[str, str], float] | None = None) -> dict[str, Any]:
    """Corpus and per-sample BLEU-1..4 (sacrebleu), ROUGE-L F (rouge-score, Porter stems) and METEOR (nltk).

    BLEU-n is the cumulative BLEU with n-gram orders 1..n (sacrebleu ``max_ngram_order=n``, 13a tokenizer);
    corpus BLEU pools n-gram counts, per-sample BLEU uses sacrebleu's default exp smoothing. ROUGE-L and
    METEOR are averaged over samples for the corpus value. ``judge(reference, hypothesis) -> score`` is an
    optional LLM-as-judge hook (off by default).
    """
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import single_meteor_score
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(references))]
    refs = [r or "" for r in references]
    hyps = [h or "" for h in hypotheses]
    wn, has_wordnet = _wordnet()
    stemmer = PorterStemmer()
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    bleus = {n: BLEU(max_ngram_order=n) for n in range(1, 5)}
    sent_bleus = {n: BLEU(max_ngram_order=n, effective_order=True) for n in range(1, 5)}
    per_sample = []
    for qid, r, h in zip(ids, refs, hyps):
        row: dict[str, Any] = {"id": qid}
        for n in range(1, 5):
            row[f"bleu{n}"] = sent_bleus[n].sentence_score(h, [r]).score
        row["rougeL"] = 100.0 * rouge.score(r, h)["rougeL"].fmeasure
        rt, ht = tokenize(r), tokenize(h)
        row["meteor"] = 100.0 * single_meteor_score(rt, ht, stemmer=stemmer, wordnet=wn) if rt and ht else 0.0
        if judge is not None:
            row["judge"] = float(judge(r, h))
        per_sample.append(row)
    corpus: dict[str, Any] = {f"bleu{n}": bleus[n].corpus_score(hyps, [refs]).score if refs else None for n in range(1, 5)}
    for k in ("rougeL", "meteor") + (("judge",) if judge is not None else ()):
        corpus[k] = float(np.mean([p[k] for p in per_sample])) if per_sample else None
    return {
        "n": len(refs),
        "corpus": corpus,
        "per_sample": per_sample,
        "meteor_synonyms": has_wordnet,
        "notes": ("METEOR uses exact + Porter-stem + WordNet synonym matching" if has_wordnet else
                  "METEOR uses exact + Porter-stem matching only: WordNet data is not installed and is never "
                  "downloaded at run time, so synonym matching is off (scores are slightly lower than "
                  "with WordNet)"),
    }


def score_open(bench: Benchmark | Sequence[BenchItem], raw_outputs: dict[str, str | None],
               skipped: dict[str, str] | None = None, judge: Callable[[str, str], float] | None = None
               ) -> dict[str, Any]:
    """Caption metrics over open-ended items that have an output (others counted as skipped / missing)."""
    items = bench.open_items if isinstance(bench, Benchmark) else [it for it in bench if not it.is_choice]
    skipped = dict(skipped or {})
    done = [it for it in items if raw_outputs.get(it.qid) is not None and it.qid not in skipped]
    m = caption_metrics([it.reference or "" for it in done], [raw_outputs[it.qid] or "" for it in done],
                        [it.qid for it in done], judge=judge)
    status = Counter(skipped.get(it.qid) for it in items)
    m.update({"n": len(items), "n_answered": len(done), "n_skipped_no_features": status["no_features"],
              "n_skipped_no_patches": status["no_patches"],
              "n_missing_output": sum(it.qid not in skipped for it in items) - len(done)})
    by_task: dict[str, list[dict]] = defaultdict(list)
    per = {p["id"]: p for p in m["per_sample"]}
    for it in done:
        by_task[it.narrow_category or it.group or "all"].append(per[it.qid])
    if len(by_task) > 1:
        m["per_task"] = {k: {"n": len(v), **{mk: float(np.mean([p[mk] for p in v]))
                                              for mk in ("bleu1", "bleu4", "rougeL", "meteor")}}
                         for k, v in sorted(by_task.items())}
    return m


# ---------------------------------------------------------------------------------------------- leakage


def training_slide_ids(path: str | os.PathLike) -> set[str]:
    """Slide ids used for training, from a `build-instructions` manifest (its `output` JSON) or a training JSON."""
    path = Path(path)
    data = read_json(path, "training manifest or training JSON", "--train-manifest")
    if isinstance(data, dict) and "output" in data:  # our manifest: the kept records are in `output`
        out = Path(data["output"])
        if not out.exists():
            out = path.with_name(path.name.replace(".manifest.json", ".json"))
        if not out.exists():
            raise BenchmarkFormatError(f"{path}: training JSON named by the manifest not found: {data['output']}")
        path = out
        data = read_json(out, "training JSON", "--train-manifest")
    ids = set()
    if isinstance(data, list):
        ids = {r["slide_id"] for r in data if isinstance(r, dict) and r.get("slide_id")}
    return ids | benchmark_slide_ids(path)


def leakage_check(bench: Benchmark, train_manifests: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Evaluation slides that also appear in training data (ids compared as the leakage guard compares them,
    `instructions.leak_key`; a warning is printed by the callers)."""
    manifests = [str(p) for p in train_manifests]
    train: set[str] = set()
    for p in manifests:
        train |= {leak_key(s) for s in training_slide_ids(p)}
    eval_ids = set(bench.slide_ids())
    overlap = sorted(s for s in eval_ids if leak_key(s) in train)
    return {"checked": bool(manifests), "train_manifests": manifests, "n_eval_slides": len(eval_ids),
            "n_overlap": len(overlap), "slides": overlap,
            "n_questions_on_overlap": sum(it.slide_id in set(overlap) for it in bench.items)}


# ---------------------------------------------------------------------------------------------- scoring


def score_outputs(bench: Benchmark, raw_outputs: dict[str, str | None], skipped: dict[str, str] | None = None,
                  train_manifests: Iterable[str | os.PathLike] = (), settings: dict[str, Any] | None = None,
                  judge: Callable[[str, str], float] | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """All metrics for one benchmark; the top level holds the closed-question metrics when there are any.

    `skipped`: question id -> why it was not asked (`no_features`: no store; `no_patches`: an empty store).
    """
    metrics: dict[str, Any] = {"benchmark": bench.path or bench.name, "format": bench.format,
                               "group_name": bench.group_name}
    if bench.choice_items:
        metrics.update(score_choice(bench, raw_outputs, skipped, n_boot=n_boot))
    else:
        metrics.update({"n": 0, "n_answered": 0, "n_skipped_no_features": 0, "n_skipped_no_patches": 0,
                        "accuracy": None, "accuracy_ci95": None, "accuracy_answered": None, "unparsable": 0,
                        "unparsable_rate": None, "per_broad_category": {}, "per_narrow_category": {},
                        "baselines": answer_prior_baselines([]), "margin_over_majority": None,
                        "n_answer_not_in_choices": 0, "answer_not_in_choices": []})
    if bench.open_items:
        metrics["captions"] = score_open(bench, raw_outputs, skipped, judge=judge)
    metrics["leakage"] = leakage_check(bench, train_manifests)
    metrics["settings"] = dict(settings or {})
    return metrics


def warn_leakage(metrics: dict[str, Any], stream=sys.stderr) -> None:
    leak = metrics.get("leakage") or {}
    if leak.get("n_overlap"):
        shown = ", ".join(leak["slides"][:10]) + (" ..." if leak["n_overlap"] > 10 else "")
        print(f"WARNING: {leak['n_overlap']} evaluation slide(s) ({leak['n_questions_on_overlap']} questions) also "
              f"appear in the training data: {shown}", file=stream)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """A few human lines: accuracy (missing answers counted wrong) beside the answer-prior baselines."""
    lines = []
    if metrics.get("n"):
        acc, ci = metrics.get("accuracy"), metrics.get("accuracy_ci95")
        b = metrics["baselines"]
        ci_s = f" (95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else ""
        n_unasked = metrics["n"] - metrics["n_answered"]
        answered = metrics.get("accuracy_answered")
        lines.append(f"accuracy {100 * acc:.1f}%{ci_s} over all {metrics['n']} questions, the {n_unasked} without "
                     f"an answer counted wrong ({metrics['n_skipped_no_features']} skipped: no feature store, "
                     f"{metrics.get('n_skipped_no_patches', 0)} skipped: store without patches, "
                     f"{metrics.get('n_missing_output', 0)} missing from the outputs); "
                     + (f"{100 * answered:.1f}% over the {metrics['n_answered']} answered; " if answered is not None
                        else "none answered; ")
                     + f"unparsable {metrics['unparsable']}")
        lines.append(f"baselines: random {100 * b['random']:.1f}%, always '{b['most_frequent_letter']['letter']}' "
                     f"{100 * b['most_frequent_letter']['accuracy']:.1f}%, per-category majority "
                     f"{100 * b['per_category_majority']['accuracy']:.1f}%")
        if metrics.get("margin_over_majority") is not None:
            lines.append(f"margin over the most frequent letter: {metrics['margin_over_majority']:+.1f} points")
    bad = metrics.get("answer_not_in_choices") or []
    if bad:
        shown = ", ".join(str(d["id"]) for d in bad[:10]) + (" ..." if len(bad) > 10 else "")
        lines.append(f"{len(bad)} benchmark item(s) left out of scoring: their answer is not among their choices "
                     f"(ids {shown})")
    cap = metrics.get("captions")
    if cap and cap.get("n_answered"):
        c = cap["corpus"]
        lines.append("captions: " + ", ".join(f"{k} {v:.2f}" for k, v in c.items() if v is not None)
                     + f" over {cap['n_answered']}/{cap['n']}")
    return lines


def load_judge(spec: str | None) -> Callable[[str, str], float] | None:
    """``module:function`` taking (reference, hypothesis) and returning a score; None when not given."""
    if not spec:
        return None
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise UsageError(f"--judge must be module:function, got {spec!r}")
    try:
        judge = getattr(importlib.import_module(mod), fn)
    except ImportError as exc:
        raise UsageError(f"--judge {spec}: cannot import module {mod!r} ({exc}); is it on PYTHONPATH?") from exc
    except AttributeError:
        raise UsageError(f"--judge {spec}: module {mod!r} has no function {fn!r}") from None
    if not callable(judge):
        raise UsageError(f"--judge {spec}: {fn!r} is not a function")
    return judge


def main(argv: list[str]) -> int:
    """`slidechat score --benchmark FILE --outputs OUTPUT.csv --out metrics.json`."""
    p = command_parser("slidechat score", "Score an outputs CSV against a benchmark (also outputs of the original "
                       "SlideChat test tool): accuracy with a bootstrap CI, per category, baselines, leakage check.",
                       "slidechat score --benchmark SlideBench-VQA-TCGA.csv --outputs outputs.csv --out metrics.json")
    p.add_argument("--benchmark", required=True, help="SlideBench CSV/JSON, WSI-Bench JSON/folder or caption CSV")
    p.add_argument("--outputs", required=True, help="CSV with the question ID (or rows in benchmark order) and Output")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--train-manifest", nargs="*", default=[], metavar="FILE",
                   help="training manifest(s)/JSON(s) for the leakage check")
    p.add_argument("--judge", default=None, help="optional LLM-as-judge hook module:function(reference, hypothesis)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CI")
    a = p.parse_args(argv)
    bench = load_benchmark(a.benchmark)
    rows = read_outputs_csv(a.outputs)
    raw = match_outputs(bench, rows, a.outputs)
    skipped = skipped_in_outputs(bench, rows, a.outputs)
    metrics = score_outputs(bench, raw, skipped, a.train_manifest, settings={"outputs": a.outputs},
                            judge=load_judge(a.judge), n_boot=a.bootstrap)
    write_json(a.out, metrics)
    for line in summary_lines(metrics):
        print(line)
    warn_leakage(metrics)
    return 0
