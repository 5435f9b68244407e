"""Answer extraction, accuracy/baselines on the real 1,494-question SlideBench JSON, caption metrics, CLI."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pandas as pd
import pytest

from slidechat.benchmarks_io import TCGA_COLUMNS, BenchmarkFormatError, load_benchmark
from slidechat.cli import main as cli
from slidechat.scoring import bootstrap_ci, caption_metrics, extract_answer, score_outputs

OPTS = {"A": "Squamous cell carcinoma", "B": "Small cell lung carcinoma", "C": "Papillary adenocarcinoma",
        "D": "Adenocarcinoma"}

EXTRACTOR_TABLE = [
    ("B", "B"), ("b", "B"), (" C.", "C"), ("(D)", "D"), ("**A**", "A"), ("[B]", "B"), ("B<|im_end|>", "B"),
    ("Answer: B", "B"), ("answer: C", "C"), ("The answer is (C).", "C"), ("The correct answer is D.", "D"),
    ("Final answer: **A**", "A"), ("The best choice is **C**", "C"), ("$\\boxed{D}$", "D"),
    ("\\boxed{(B)}", "B"), ("Option A is unlikely; the answer is B", "B"),
    ("B. Small cell lung carcinoma", "B"), ("C) Papillary adenocarcinoma\nThe slide shows papillae.", "C"),
    ("B\nThe tumour shows small cells.", "B"),
    ("The slide shows a papillary adenocarcinoma.", "C"),  # option text; "adenocarcinoma" (D) is inside it
    ("Adenocarcinoma.", "D"), ("small cell lung carcinoma", "B"),
    # unparsable: no letter, several options named, or a leading article "A"
    ("It is an adenocarcinoma rather than squamous cell carcinoma", None),
    ("answer: a poorly differentiated tumour", None), ("A 45-year-old patient", None),
    ("I cannot determine this from the image.", None), ("", None), (None, None),
]


@pytest.mark.parametrize("text,expected", EXTRACTOR_TABLE)
def test_extractor_table(text, expected):
    assert extract_answer(text, OPTS) == expected


@pytest.mark.parametrize("text,expected", [("Yes", "Yes"), ("no.", "No"), ("No, the prognosis is good.", "No"),
                                           ("Yes. There is no sign of spread", "Yes"), ("The answer is no", "No"),
                                           ("The prognosis is poor", None)])
def test_extractor_yes_no(text, expected):
    assert extract_answer(text, {"Yes": "Yes", "No": "No"}) == expected


@pytest.fixture(scope="module")
def slidebench(vlm_data):
    path = vlm_data / "slidebench_vqa_tcga_1494.json"
    return path, json.loads(path.read_text())["samples"], load_benchmark(path)


def test_always_b_on_real_slidebench(slidebench):
    _, raw, bench = slidebench
    m = score_outputs(bench, {it.qid: "B" for it in bench.items}, n_boot=200)
    n_b = sum(s["answer"] == "B" for s in raw)
    assert m["n"] == m["n_answered"] == len(raw) == 1494
    assert m["accuracy"] == pytest.approx(n_b / len(raw))
    assert round(100 * m["accuracy"], 1) == 41.4  # the README's always-"B" figure
    assert m["unparsable"] == 0 and m["margin_over_majority"] == pytest.approx(0.0)
    per_narrow = defaultdict(Counter)
    for s in raw:
        per_narrow[s["category"].split(" - ")[1]][s["answer"]] += 1
    assert set(m["per_narrow_category"]) == set(per_narrow)
    for cat, cnt in per_narrow.items():
        got = m["per_narrow_category"][cat]
        assert (got["n"], got["correct"]) == (sum(cnt.values()), cnt["B"])
    broad = Counter(s["category"].split(" - ")[0] for s in raw)
    assert {k: v["n"] for k, v in m["per_broad_category"].items()} == broad == {"Diagnosis": 1002, "Microscopy": 391,
                                                                                "Clinical": 101}


def test_baselines_on_real_slidebench(slidebench):
    _, raw, bench = slidebench
    b = score_outputs(bench, {}, n_boot=10)["baselines"]
    letters = Counter(s["answer"] for s in raw)
    assert b["most_frequent_letter"]["letter"] == letters.most_common(1)[0][0] == "B"
    assert b["random"] == pytest.approx(0.25)
    per_cat = defaultdict(Counter)
    for s in raw:
        per_cat[s["category"]][s["answer"]] += 1
    expected = sum(max(c.values()) for c in per_cat.values()) / len(raw)
    assert b["per_category_majority"]["accuracy"] == pytest.approx(expected)
    assert round(100 * b["per_category_majority"]["accuracy"], 1) == 44.4  # README figure


def test_true_answer_for_a_subset_and_unparsable(slidebench):
    _, raw, bench = slidebench
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    outputs = {}
    for i, s in enumerate(raw):
        if i % 3 == 0:
            outputs[str(i)] = f"The answer is ({s['answer']})."
        elif i % 3 == 1:
            outputs[str(i)] = wrong[s["answer"]]
        elif i % 7 == 0:
            outputs[str(i)] = "I cannot tell from this slide."
        else:
            outputs[str(i)] = None  # no output at all: not answered
    m = score_outputs(bench, outputs, n_boot=200)
    n_answered = sum(v is not None for v in outputs.values())
    n_correct = len(range(0, len(raw), 3))
    assert m["n_answered"] == n_answered and m["n_missing_output"] == len(raw) - n_answered
    assert m["correct"] == n_correct
    assert m["accuracy"] == pytest.approx(n_correct / len(raw))  # headline: no output counts as wrong
    assert m["accuracy_answered"] == pytest.approx(n_correct / n_answered)
    assert m["unparsable"] == sum(i % 3 == 2 and i % 7 == 0 for i in range(len(raw)))
    lo, hi = m["accuracy_ci95"]
    assert lo < m["accuracy"] < hi
    tumour_ci = bootstrap_ci([1.0] * 10 + [0.0] * 10, n_boot=500)
    assert tumour_ci[0] < 0.5 < tumour_ci[1]
    for cat, stats in m["per_broad_category"].items():
        idx = [i for i, s in enumerate(raw) if s["category"].startswith(cat + " - ")]
        assert stats["correct"] == sum(i % 3 == 0 for i in idx)
        assert stats["n_answered"] == sum(outputs[str(i)] is not None for i in idx)


def test_skipped_questions_are_counted_not_dropped(slidebench):
    _, raw, bench = slidebench
    first_slide = raw[0]["slide_id"]
    skipped = [str(i) for i, s in enumerate(raw) if s["slide_id"] == first_slide]
    outputs = {str(i): s["answer"] for i, s in enumerate(raw) if str(i) not in skipped}
    m = score_outputs(bench, outputs, skipped=dict.fromkeys(skipped, "no_features"), n_boot=50)
    assert m["n"] == 1494 and m["n_skipped_no_features"] == len(skipped) > 0
    assert m["accuracy_answered"] == 1.0 and m["accuracy"] == pytest.approx((1494 - len(skipped)) / 1494)


def test_score_cli_on_original_tool_outputs(tmp_path, slidebench):
    path, raw, _ = slidebench
    # the original tool writes pandas to_csv with an index column; the JSON form is matched by row order (ID)
    df = pd.DataFrame({"ID": range(len(raw)), "Output": ["C" if i % 2 else "B. something" for i in range(len(raw))]})
    df.to_csv(tmp_path / "out.csv")
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"id": "x", "image": [raw[5]["slide_id"] + ".csv"], "conversations": []}]))
    rc = cli(["score", "--benchmark", str(path), "--outputs", str(tmp_path / "out.csv"), "--out",
              str(tmp_path / "m.json"), "--train-manifest", str(train), "--bootstrap", "100"])
    assert rc == 0
    m = json.loads((tmp_path / "m.json").read_text())
    expected = sum((s["answer"] == "C") if i % 2 else (s["answer"] == "B") for i, s in enumerate(raw)) / len(raw)
    assert m["accuracy"] == pytest.approx(expected)
    for key in ("accuracy", "n", "unparsable", "per_broad_category", "per_narrow_category", "baselines",
                "accuracy_ci95", "n_answered", "n_skipped_no_features", "unparsable_rate", "margin_over_majority"):
        assert key in m
    assert set(m["baselines"]) >= {"random", "most_frequent_letter", "per_category_majority"}
    assert m["leakage"]["slides"] == [raw[5]["slide_id"]]
    assert m["leakage"]["n_questions_on_overlap"] == sum(s["slide_id"] == raw[5]["slide_id"] for s in raw)


def test_caption_metrics_behave():
    ref = ["The tumour shows sheets of atypical squamous cells with abundant eosinophilic cytoplasm."]
    same = caption_metrics(ref, ref)
    assert same["corpus"]["bleu4"] == pytest.approx(100.0)
    assert same["corpus"]["rougeL"] == pytest.approx(100.0)
    assert same["corpus"]["meteor"] > 99.0
    other = caption_metrics(ref, ["Normal lymph node, no malignancy."])
    assert other["corpus"]["bleu1"] < 15 and other["corpus"]["meteor"] < 10
    # Porter stems match ("tumours"/"tumour", "showing"/"shows") even without WordNet synonyms
    stemmed = caption_metrics(ref, ["The tumours showing sheet of atypical squamous cell with abundant eosinophilic "
                                    "cytoplasm."])
    exact_only = caption_metrics(ref, ["The xx yy sheets of atypical squamous zz with abundant eosinophilic "
                                       "cytoplasm."])
    assert stemmed["corpus"]["meteor"] > exact_only["corpus"]["meteor"]
    assert stemmed["corpus"]["bleu1"] < 100
    assert [p["id"] for p in stemmed["per_sample"]] == ["0"]
    judged = caption_metrics(ref, ref, judge=lambda r, h: float(r == h))
    assert judged["corpus"]["judge"] == 1.0


def test_open_ended_wsi_bench_scored_as_captions(vlm_data):
    bench = load_benchmark(vlm_data / "wsi-bench-test" / "Treatment_Planing_test.json")
    outs = {it.qid: (it.reference if i < 10 else None) for i, it in enumerate(bench.items)}
    m = score_outputs(bench, outs, n_boot=10)
    cap = m["captions"]
    assert cap["n"] == len(bench.items) and cap["n_answered"] == 10
    assert cap["corpus"]["rougeL"] == pytest.approx(100.0)
    assert m["n"] == 0 and m["accuracy"] is None


def _bench_csv(path, answers):
    rows = [{"ID": i, "Slide": f"S{i % 2}", "Tumor": "T", "Broad Category": "Diagnosis", "Narrow Category": "N",
             "Question": f"q{i}?", "A": "a", "B": "b", "C": "c", "D": "d", "Answer": a} for i, a in enumerate(answers)]
    pd.DataFrame(rows, columns=TCGA_COLUMNS).to_csv(path, index=False)
    return path


def test_duplicate_ids_in_outputs_are_an_error(tmp_path, capsys):
    bench = _bench_csv(tmp_path / "b.csv", "ABCA")
    pd.DataFrame({"ID": [0, 1, 2, 3, 1], "Output": ["A", "B", "C", "A", "D"]}).to_csv(tmp_path / "o.csv", index=False)
    rc = cli(["score", "--benchmark", str(bench), "--outputs", str(tmp_path / "o.csv"), "--out", str(tmp_path / "m.json")])
    assert rc == 2 and "question ID(s) 1 appear in more than one row" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
    _bench_csv(tmp_path / "dup.csv", "AB")
    df = pd.read_csv(tmp_path / "dup.csv")
    df["ID"] = [7, 7]
    df.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(BenchmarkFormatError, match="question id\\(s\\) 7 appear more than once"):
        load_benchmark(tmp_path / "dup.csv")


def test_short_outputs_count_missing_as_wrong(tmp_path, capsys):
    bench = _bench_csv(tmp_path / "b.csv", "ABCDABCDAB")
    pd.DataFrame({"ID": [0, 1, 2, 3], "Output": ["A", "B", "C", "A"]}).to_csv(tmp_path / "o.csv", index=False)
    assert cli(["score", "--benchmark", str(bench), "--outputs", str(tmp_path / "o.csv"),
                "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["n"], m["n_answered"], m["n_missing_output"], m["correct"]) == (10, 4, 6, 3)
    assert m["accuracy"] == pytest.approx(0.3) and m["accuracy_answered"] == pytest.approx(0.75)
    out = capsys.readouterr().out
    assert "accuracy 30.0%" in out and "the 6 without an answer counted wrong" in out
    assert "6 missing from the outputs" in out and "75.0% over the 4 answered" in out


def test_answer_not_among_choices_is_reported(tmp_path, capsys):
    bench = _bench_csv(tmp_path / "b.csv", ["A", "E", "B", "", "C"])
    assert [it.answer for it in load_benchmark(bench).items] == ["A", None, "B", None, "C"]
    pd.DataFrame({"ID": range(5), "Output": ["A", "E", "B", "A", "D"]}).to_csv(tmp_path / "o.csv", index=False)
    assert cli(["score", "--benchmark", str(bench), "--outputs", str(tmp_path / "o.csv"),
                "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_answer_not_in_choices"] == 2 and [d["id"] for d in m["answer_not_in_choices"]] == ["1", "3"]
    assert m["answer_not_in_choices"][0]["answer"] == "E"
    assert (m["n"], m["correct"], m["accuracy"]) == (3, 2, pytest.approx(2 / 3))  # scored over the 3 valid items
    assert "2 benchmark item(s) left out of scoring: their answer is not among their choices (ids 1, 3)" in (
        capsys.readouterr().out)
