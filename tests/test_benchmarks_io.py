"""Benchmark readers and the outputs CSV (round trip with the original SlideChat tool's columns)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from slidechat.benchmarks_io import (
    BenchmarkFormatError,
    TCGA_COLUMNS,
    benchmark_slide_ids,
    load_benchmark,
    match_outputs,
    parse_inline_options,
    read_outputs_csv,
    write_outputs_csv,
)
from wsicore.errors import InputError

TCGA_ROWS = [
    {"ID": 17, "Slide": "TCGA-05-4244-01Z-00-DX1", "Tumor": "LUAD", "Broad Category": "Diagnosis",
     "Narrow Category": "Grading", "Question": "What is the grade of the tumor?", "A": "G1", "B": "G2", "C": "G3",
     "D": "G4", "Answer": "C"},
    {"ID": 18, "Slide": "TCGA-AR-A255-01Z-00-DX1", "Tumor": "BRCA", "Broad Category": "Microscopy",
     "Narrow Category": "Tumor Characteristics", "Question": "Which feature, with a comma, is seen?",
     "A": "Necrosis, extensive", "B": "Mitoses", "C": "Fibrosis", "D": None, "Answer": "A"},
]


def _write_tcga(path: Path, rows=TCGA_ROWS) -> Path:
    pd.DataFrame(rows, columns=TCGA_COLUMNS).to_csv(path, index=False)
    return path


def test_slidebench_tcga_csv_prompt_and_fields(tmp_path):
    bench = load_benchmark(_write_tcga(tmp_path / "SlideBench-VQA(TCGA).csv"))
    assert bench.format == "slidebench_tcga" and bench.group_name == "tumor"
    a, b = bench.items
    assert a.qid == "17" and a.slide_id == "TCGA-05-4244-01Z-00-DX1" and a.answer == "C"
    # the original test tool's prompt body: question then "X. option" lines, empty options left out
    assert a.prompt == "What is the grade of the tumor?\nA. G1\nB. G2\nC. G3\nD. G4"
    assert b.prompt == "Which feature, with a comma, is seen?\nA. Necrosis, extensive\nB. Mitoses\nC. Fibrosis"
    assert list(b.options) == ["A", "B", "C"]
    assert (a.group, a.broad_category, a.narrow_category) == ("LUAD", "Diagnosis", "Grading")


def test_outputs_csv_round_trip_keeps_original_columns(tmp_path):
    src = _write_tcga(tmp_path / "bench.csv")
    bench = load_benchmark(src)
    outs = {"17": {"Output": "C. G3", "Prediction": "C", "Status": "ok"},
            "18": {"Output": "The answer is (B), mitoses\nmany", "Prediction": "B", "Status": "ok"}}
    out = write_outputs_csv(tmp_path / "outputs.csv", bench, outs, extra_columns=["Status"])
    df = pd.read_csv(out)
    assert list(df.columns) == TCGA_COLUMNS + ["Output", "Prediction", "Status"]
    orig = pd.read_csv(src)
    pd.testing.assert_frame_equal(df[TCGA_COLUMNS], orig[TCGA_COLUMNS])
    assert df.loc[1, "Output"] == "The answer is (B), mitoses\nmany"
    # and the scorer reads it back by ID
    raw = match_outputs(bench, read_outputs_csv(out))
    assert raw == {"17": "C. G3", "18": "The answer is (B), mitoses\nmany"}


def test_original_tool_output_csv_is_matched_by_id(tmp_path):
    """xtuner/tools/test.py writes df.to_csv(path) with pandas' unnamed index column and float-ish IDs."""
    bench = load_benchmark(_write_tcga(tmp_path / "bench.csv"))
    df = pd.DataFrame([{**r, "Output": o} for r, o in zip(TCGA_ROWS[::-1], ["B", None])])
    df["ID"] = df["ID"].astype(float)  # pandas may write 18.0
    df.to_csv(tmp_path / "output_my_test.csv")
    raw = match_outputs(bench, read_outputs_csv(tmp_path / "output_my_test.csv"))
    assert raw == {"17": None, "18": "B"}


def test_missing_columns_are_named(tmp_path):
    p = tmp_path / "bad.csv"
    pd.DataFrame([{"ID": 1, "Slide": "s", "Question": "q", "A": "x", "B": "y"}]).to_csv(p, index=False)
    with pytest.raises(BenchmarkFormatError) as e:
        load_benchmark(p)
    for col in ("Tumor", "Broad Category", "Narrow Category", "Answer"):
        assert col in str(e.value)
    assert "Question" not in str(e.value).split("missing column(s)")[1].split("(found")[0]
    p2 = tmp_path / "bad.json"
    p2.write_text(json.dumps({"samples": [{"slide_id": "s", "question": "q", "choices": ["A) x"]}]}))
    with pytest.raises(BenchmarkFormatError, match="answer"):
        load_benchmark(p2)
    with pytest.raises(InputError, match="--benchmark"):
        load_benchmark(tmp_path / "nope.csv")


def test_bcnb_csv_groups_by_task(tmp_path):
    p = tmp_path / "SlideBench-VQA(BCNB).csv"
    rows = [{"ID": i, "Slide": str(i % 3 + 1), "Task": t, "Question": "q?", "A": "yes", "B": "no", "C": None,
             "D": None, "Answer": a} for i, (t, a) in enumerate([("ER", "A"), ("PR", "B"), ("ER", "B")])]
    pd.DataFrame(rows).to_csv(p, index=False)
    bench = load_benchmark(p)
    assert bench.format == "slidebench_bcnb" and bench.group_name == "task"
    assert [it.group for it in bench.items] == ["ER", "PR", "ER"]
    assert [it.slide_id for it in bench.items] == ["1", "2", "3"]
    assert all(len(it.options) == 2 for it in bench.items)


def test_caption_csv(tmp_path):
    p = tmp_path / "SlideBench-Caption.csv"
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Slide", "Caption"])
        w.writerow(["TCGA-05-4244-01Z-00-DX1.abc", "Sheets of atypical cells."])
    bench = load_benchmark(p)
    assert bench.format == "caption_csv"
    (it,) = bench.items
    assert not it.is_choice and it.reference == "Sheets of atypical cells."
    assert it.slide_id == "TCGA-05-4244-01Z-00-DX1" and it.qid == "0" and it.row["ID"] == "0"


def test_real_slidebench_json(vlm_data):
    path = vlm_data / "slidebench_vqa_tcga_1494.json"
    raw = json.loads(path.read_text())["samples"]
    bench = load_benchmark(path)
    assert bench.format == "slidebench_json" and len(bench.items) == len(raw) == 1494
    assert len(bench.slide_ids()) == len({s["slide_id"] for s in raw}) == 591
    first = bench.items[0]
    assert first.qid == "0"
    assert first.prompt == raw[0]["question"] + "\n" + "\n".join(c.replace(") ", ". ", 1) for c in raw[0]["choices"])
    assert Counter(it.narrow_category for it in bench.items) == Counter(s["category"].split(" - ")[1] for s in raw)
    assert [it.answer for it in bench.items] == [s["answer"] for s in raw]


def test_real_wsi_bench_folder(vlm_data):
    folder = vlm_data / "wsi-bench-test"
    bench = load_benchmark(folder)
    n_files = {f.stem: len(json.loads(f.read_text())) for f in folder.glob("*.json")}
    assert len(bench.items) == sum(n_files.values())
    tasks = Counter(it.narrow_category for it in bench.choice_items)
    assert tasks == {k.removesuffix("_test"): v for k, v in n_files.items() if "choice" in k or "_TF_" in k}
    for it in bench.choice_items:
        assert it.answer in it.options
        if "choice" in it.narrow_category:
            assert list(it.options) == ["A", "B", "C", "D"] and all(it.options.values())
    assert len({it.qid for it in bench.items}) == len(bench.items)  # ids made unique across files
    one = load_benchmark(folder / "Staging_choice_test.json")
    assert len(one.items) == n_files["Staging_choice_test"] and one.items[0].prompt.endswith("D) Tis N0 M0")


def test_parse_inline_options_keeps_last_run():
    stem, opts = parse_inline_options("Is A) really first? A) Luminal A   B) Luminal B   C) HER2-enriched   D) Basal")
    assert stem == "Is A) really first?"
    assert opts == {"A": "Luminal A", "B": "Luminal B", "C": "HER2-enriched", "D": "Basal"}


def test_benchmark_slide_ids_for_the_leakage_guard(vlm_data, tmp_path):
    """One reader: what evaluation reads, plus files that only list slides (MultiPathQA, training JSON)."""
    bench = load_benchmark(vlm_data / "slidebench_vqa_tcga_1494.json")
    assert benchmark_slide_ids(vlm_data / "slidebench_vqa_tcga_1494.json") == set(bench.slide_ids())
    mpqa = benchmark_slide_ids(vlm_data / "MultiPathQA.csv")
    with open(vlm_data / "MultiPathQA.csv", newline="") as fh:
        assert mpqa == {r["image_path"].rsplit(".", 1)[0] for r in csv.DictReader(fh)}
    assert "GTEX-OIZH-0626" in mpqa
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"id": "x", "image": ["TCGA-AR-A255-01Z-00-DX1.csv"], "conversations": []},
                                 {"id": "y", "image": "b/c.zarr", "slide_id": "renamed", "conversations": []}]))
    assert benchmark_slide_ids(train) == {"TCGA-AR-A255-01Z-00-DX1", "c", "renamed"}
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BenchmarkFormatError, match="no slide column"):
        benchmark_slide_ids(tmp_path / "x.csv")
