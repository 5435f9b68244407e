"""`slidechat evaluate` end to end with a tiny random SlideChat (tiny Qwen2 LLM built in-process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from preprocessing.stores import FeatureStoreIndex, StoreError, read_slide_map, write_h5_store, write_zarr_store
from slidechat.benchmarks_io import TCGA_COLUMNS, load_benchmark
from slidechat.cli import main as cli
from slidechat.evaluate import EvalSettings, build_question, evaluate, generate_for_benchmark
from slidechat.checkpoint import load_model, new_model, save_model
from slidechat.model import SlideChatConfig
from slidechat.scoring import summary_lines


def tiny_model_config() -> SlideChatConfig:
    return SlideChatConfig(feature_dim=512, encoder_layers=1, encoder_ffn_dim=64, encoder_heads=4,
                           segment_lengths=[16, 32], dilated_ratios=[1, 2])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llm) -> Path:
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = new_model(tiny_llm, tiny_model_config())
    return save_model(model, root / "slidechat")


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir).eval()


def _store(path: Path, n: int, seed: int, kind: str = "zarr") -> Path:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, 512)).astype(np.float32)
    coords = np.stack(np.meshgrid(np.arange(n) * 224, [0]), -1).reshape(-1, 2).astype(np.int64)
    attrs = {"slide_id": path.stem, "encoder": "conch_tiny"}
    return write_zarr_store(path, feats, coords, None, attrs) if kind == "zarr" else write_h5_store(path, feats, coords, None, attrs)


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    feats = root / "features"
    feats.mkdir()
    _store(feats / "SLIDE-A.zarr", 40, 1)
    _store(feats / "SLIDE-B.h5", 25, 2, kind="h5")
    rows = []
    for i, (slide, ans) in enumerate([("SLIDE-A", "A"), ("SLIDE-B", "B"), ("SLIDE-A", "C"), ("SLIDE-MISSING", "B"),
                                      ("SLIDE-B", "D"), ("SLIDE-A", "B")]):
        rows.append({"ID": 100 + i, "Slide": slide, "Tumor": "DEMO", "Broad Category": "Diagnosis",
                     "Narrow Category": "Tissue" if i % 2 else "Grade", "Question": f"Question number {i}?",
                     "A": "adenocarcinoma", "B": "lymphoid", "C": "stroma", "D": "necrosis", "Answer": ans})
    bench = root / "bench.csv"
    pd.DataFrame(rows, columns=TCGA_COLUMNS).to_csv(bench, index=False)
    return bench, feats


def test_question_format_is_the_original_prompt(bench_setup):
    bench = load_benchmark(bench_setup[0])
    q = build_question(bench.items[0], EvalSettings())
    assert q == "<image>\nQuestion number 0?\nA. adenocarcinoma\nB. lymphoid\nC. stroma\nD. necrosis"
    q2 = build_question(bench.items[0], EvalSettings(answer_with_letter=True))
    assert q2 == q + "\nAnswer with the option's letter from the given choices directly."


def test_reuse_and_batching_give_the_same_answers_as_reencoding(model, bench_setup):
    bench = load_benchmark(bench_setup[0])
    finder = FeatureStoreIndex(bench_setup[1])
    calls = {"encode": 0}
    orig = model.encode_slide

    def counting(*a, **k):
        calls["encode"] += 1
        return orig(*a, **k)

    model.encode_slide = counting
    try:
        fast = generate_for_benchmark(model, bench, finder, EvalSettings(max_new_tokens=6, batch_size=3), log=None)
        n_fast = calls["encode"]
        calls["encode"] = 0
        slow = generate_for_benchmark(model, bench, finder,
                                      EvalSettings(max_new_tokens=6, reuse_slide_encoding=False), log=None)
        n_slow = calls["encode"]
    finally:
        del model.encode_slide
    assert n_fast == 2  # one encoding per slide that has features
    assert n_slow == 5  # one per answered question
    assert fast.skipped == slow.skipped == {"103": "no_features"}
    assert {q: v["Output"] for q, v in fast.outputs.items()} == {q: v["Output"] for q, v in slow.outputs.items()}
    assert all(fast.outputs[q]["Output"] for q in fast.outputs if q != "103")


def test_evaluate_writes_outputs_metrics_and_reports(model, model_dir, bench_setup, tmp_path):
    bench_csv, feats = bench_setup
    manifest_json = tmp_path / "train.json"
    manifest_json.write_text(json.dumps([{"id": "t0", "image": ["SLIDE-B.csv"], "slide_id": "SLIDE-B",
                                          "conversations": []}]))
    manifest = tmp_path / "train.manifest.json"
    manifest.write_text(json.dumps({"output": str(manifest_json), "counts": {}}))
    out = tmp_path / "eval"
    m = evaluate(bench_csv, feats, model_dir, out, settings=EvalSettings(max_new_tokens=5, batch_size=2),
                 train_manifests=[manifest], model=model, log=None)
    df = pd.read_csv(out / "outputs.csv", keep_default_na=False)
    assert list(df.columns[: len(TCGA_COLUMNS)]) == TCGA_COLUMNS
    assert {"Output", "Prediction", "Status", "MaxNewTokens", "LetterInstruction"} <= set(df.columns)
    assert df["ID"].tolist() == [100, 101, 102, 103, 104, 105]
    assert df.loc[df.ID == 103, "Status"].item() == "no_features" and df.loc[df.ID == 103, "Output"].item() == ""
    assert (df.loc[df.ID != 103, "Status"] == "ok").all()
    assert (df["MaxNewTokens"] == 5).all()
    # metrics agree with an independent count over the CSV
    answered = df[df.Status == "ok"]
    correct = int((answered.Prediction == answered.Answer).sum())
    assert m["n"] == 6 and m["n_answered"] == 5 and m["n_skipped_no_features"] == 1
    assert m["correct"] == correct and m["accuracy"] == pytest.approx(correct / 6)  # the skipped one counts wrong
    assert m["accuracy_answered"] == pytest.approx(correct / 5)
    assert m["unparsable"] == int((answered.Prediction == "").sum())
    assert m["skipped_slides"] == ["SLIDE-MISSING"]
    assert m["settings"]["max_new_tokens"] == 5 and m["settings"]["answer_with_letter_instruction"] is False
    assert m["leakage"]["slides"] == ["SLIDE-B"] and m["leakage"]["n_questions_on_overlap"] == 2
    assert set(m["per_tumor"]) == {"DEMO"} and set(m["per_narrow_category"]) == {"Grade", "Tissue"}
    for name in ("metrics.json", "report.md", "report.html", "category_accuracy.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "skipped: slide has no features | 1" in report and "leakage" in report.lower()
    # scoring the written outputs again gives the same numbers (`slidechat score` on our own CSV)
    assert cli(["score", "--benchmark", str(bench_csv), "--outputs", str(out / "outputs.csv"),
                "--out", str(tmp_path / "rescored.json")]) == 0
    again = json.loads((tmp_path / "rescored.json").read_text())
    assert (again["accuracy"], again["accuracy_answered"], again["n_skipped_no_features"], again["unparsable"]) == (
        m["accuracy"], m["accuracy_answered"], m["n_skipped_no_features"], m["unparsable"])


def test_evaluate_cli_with_slide_map(model_dir, bench_setup, tmp_path, capsys):
    bench_csv, feats = bench_setup
    slide_map = tmp_path / "map.csv"
    pd.DataFrame({"Slide": ["slide-missing"], "features": [str(feats / "SLIDE-A.zarr")]}).to_csv(slide_map, index=False)
    rc = cli(["evaluate", "--benchmark", str(bench_csv), "--features-dir", str(feats), "--model", str(model_dir),
              "--out-dir", str(tmp_path / "e"), "--slide-map", str(slide_map), "--max-new-tokens", "3",
              "--answer-with-letter", "--device", "cpu"])
    assert rc == 0
    # progress in a log (no terminal): a line per slide with questions done/total, and the last one says done
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("evaluation bench: question ")]
    assert len(lines) == 3 and "question 3/6 (50%), slide SLIDE-A" in lines[0] and "ETA" in lines[0], err
    assert "question 5/6" in lines[1] and "question 6/6 (100%)" in lines[2] and "done in" in lines[2]
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n_skipped_no_features"] == 0 and m["n_answered"] == 6
    assert m["settings"]["answer_with_letter_instruction"] is True
    assert cli(["evaluate", "--benchmark", str(bench_csv), "--features-dir", str(tmp_path / "nope"), "--model",
                str(model_dir), "--out-dir", str(tmp_path / "x")]) == 2


def test_evaluate_resumes_an_interrupted_run(model, model_dir, bench_setup, tmp_path):
    from slidechat.evaluate import PARTIAL_FILE, _resume_key

    bench_csv, feats = bench_setup
    out = tmp_path / "eval"
    settings = EvalSettings(max_new_tokens=4)
    out.mkdir()
    # what a run killed after its first slide leaves behind (the answer text marks it as reused)
    lines = [{"resume_key": _resume_key(bench_csv, model_dir, None, settings, None, feats, None)},
             {"qid": "100", "Output": "B. from the first run", "Prediction": "B", "Status": "ok",
              "MaxNewTokens": 4, "LetterInstruction": False},
             {"qid": "103", "Output": "", "Prediction": "", "Status": "no_features"}]
    (out / PARTIAL_FILE).write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"qid\": \"10")
    m = evaluate(bench_csv, feats, model_dir, out, settings=settings, model=model, log=None)
    df = pd.read_csv(out / "outputs.csv", keep_default_na=False)
    assert df.loc[df.ID == 100, "Output"].item() == "B. from the first run"
    assert m["settings"]["n_resumed"] == 1 and m["settings"]["n_generated"] == 4
    assert m["n_skipped_no_features"] == 1 and not (out / PARTIAL_FILE).exists()
    # other settings: the partial file is not trusted
    (out / PARTIAL_FILE).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    m2 = evaluate(bench_csv, feats, model_dir, out, settings=EvalSettings(max_new_tokens=3), model=model, log=None)
    assert m2["settings"]["n_resumed"] == 0 and m2["settings"]["n_generated"] == 5


def test_answers_of_an_older_model_at_the_same_path_are_not_resumed(model, model_dir, bench_setup, tiny_llm,
                                                                      tmp_path):
    """The model is trained again into the same folder after an evaluation was interrupted: the answers the
    old model gave must not be mixed into the new model's results."""
    from slidechat.evaluate import PARTIAL_FILE, _resume_key

    bench_csv, feats = bench_setup
    settings = EvalSettings(max_new_tokens=4)
    here = shutil.copytree(model_dir, tmp_path / "stage2")
    out = tmp_path / "eval"
    out.mkdir()
    lines = [{"resume_key": _resume_key(bench_csv, here, None, settings, None, feats, None)},
             {"qid": "100", "Output": "B. from the old model", "Prediction": "B", "Status": "ok",
              "MaxNewTokens": 4, "LetterInstruction": False}]
    (out / PARTIAL_FILE).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    torch.manual_seed(1)
    save_model(new_model(tiny_llm, tiny_model_config()), here)  # retrained: same path, other weights
    m = evaluate(bench_csv, feats, here, out, settings=settings, model=load_model(here).eval(), log=None)
    assert m["settings"]["n_resumed"] == 0
    df = pd.read_csv(out / "outputs.csv", keep_default_na=False)
    assert "old model" not in df.loc[df.ID == 100, "Output"].item()


def test_answers_made_from_other_features_are_not_resumed(model, model_dir, bench_setup, tmp_path):
    from slidechat.evaluate import PARTIAL_FILE, _resume_key

    bench_csv, feats = bench_setup
    settings = EvalSettings(max_new_tokens=4)
    other_feats = tmp_path / "other-features"  # e.g. the first run was pointed at another encoder's stores
    shutil.copytree(feats, other_feats)
    out = tmp_path / "eval"
    out.mkdir()
    key = _resume_key(bench_csv, model_dir, None, settings, None, other_feats, None)
    (out / PARTIAL_FILE).write_text(json.dumps({"resume_key": key}) + "\n" + json.dumps(
        {"qid": "100", "Output": "B. from the first run", "Prediction": "B", "Status": "ok"}) + "\n")
    m = evaluate(bench_csv, feats, model_dir, out, settings=settings, model=model, log=None)
    assert m["settings"]["n_resumed"] == 0 and m["settings"]["n_generated"] == 5


def test_slide_map_renames_and_relative_paths(tmp_path):
    feats = tmp_path / "features"
    _store(feats / "patient-7.zarr", 4, 3)
    _store(tmp_path / "maps" / "stores" / "other.h5", 4, 4, kind="h5")
    smap = tmp_path / "maps" / "map.csv"
    smap.write_text("slide,slide_id,features\nTCGA-AA-0001-01Z-00-DX1,patient-7,\nslide-9,,stores/other.h5\n")
    index = FeatureStoreIndex(feats, read_slide_map(smap))
    assert index.resolve("tcga-aa-0001-01z-00-dx1.svs") == ("patient-7", feats / "patient-7.zarr")
    assert index.find("SLIDE-9") == tmp_path / "maps" / "stores" / "other.h5"  # relative to the map
    assert index.find("slide-10") is None
    _store(feats / "sub" / "Patient-7.zarr", 4, 5)  # the same id twice (ignoring case): ambiguous, refused
    with pytest.raises(StoreError, match="several feature stores match"):
        FeatureStoreIndex(feats).find("patient-7")


def test_zero_patch_slide_is_skipped_and_counted(model, model_dir, tmp_path):
    feats = tmp_path / "features"
    _store(feats / "SLIDE-A.zarr", 20, 1)
    write_zarr_store(feats / "SLIDE-EMPTY.zarr", np.zeros((0, 512)), np.zeros((0, 2), np.int64), None, {})
    rows = [{"ID": i, "Slide": s, "Tumor": "DEMO", "Broad Category": "Diagnosis", "Narrow Category": "Tissue",
             "Question": f"Q{i}?", "A": "a", "B": "b", "C": "c", "D": "d", "Answer": "A"}
            for i, s in enumerate(["SLIDE-A", "SLIDE-EMPTY", "SLIDE-EMPTY"])]
    bench = tmp_path / "bench.csv"
    pd.DataFrame(rows, columns=TCGA_COLUMNS).to_csv(bench, index=False)
    m = evaluate(bench, feats, model_dir, tmp_path / "e", settings=EvalSettings(max_new_tokens=3), model=model, log=None)
    df = pd.read_csv(tmp_path / "e" / "outputs.csv", keep_default_na=False)
    assert df["Status"].tolist() == ["ok", "no_patches", "no_patches"]
    assert (m["n"], m["n_answered"], m["n_skipped_no_patches"], m["n_skipped_no_features"]) == (3, 1, 2, 0)
    assert m["skipped_slides_no_patches"] == ["SLIDE-EMPTY"] and m["accuracy"] <= 1 / 3
    assert "2 skipped: store without patches" in summary_lines(m)[0]
    # `slidechat score` on these outputs sees the same skips
    assert cli(["score", "--benchmark", str(bench), "--outputs", str(tmp_path / "e" / "outputs.csv"),
                "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["n_skipped_no_patches"] == 2


def test_damaged_store_is_refused_by_evaluate(model_dir, bench_setup, tmp_path, capsys):
    bench_csv, feats = bench_setup
    copy = tmp_path / "features"
    shutil.copytree(feats, copy)
    (copy / "SLIDE-A.zarr" / "coords" / "c" / "0" / "0").unlink()  # coords would read (0, 0)
    rc = cli(["evaluate", "--benchmark", str(bench_csv), "--features-dir", str(copy), "--model", str(model_dir),
              "--out-dir", str(tmp_path / "e"), "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{copy / 'SLIDE-A.zarr'}: damaged feature store of slide SLIDE-A: coords rows 0..39 differ" in err
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_stores_made_otherwise_than_the_training_stores_are_refused(model, model_dir, bench_setup, tmp_path, capsys):
    """A model card records how the training stores were made; evaluating on other features is refused, naming
    the store, the model and the differing key (a same-width encoder swap would otherwise score silently)."""
    from slidechat.model_card import CARD_JSON

    bench_csv, feats = bench_setup
    card_dir = tmp_path / "model"
    shutil.copytree(model_dir, card_dir)
    card = {"stage": 2, "synthetic_demo": False, "features": {"encoder": "conch_v1", "transform": None,
                                                               "target_mpp": 0.5, "patch_size": 224}}
    (card_dir / CARD_JSON).write_text(json.dumps(card))
    rc = cli(["evaluate", "--benchmark", str(bench_csv), "--features-dir", str(feats), "--model", str(card_dir),
              "--out-dir", str(tmp_path / "e"), "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "encoder 'conch_tiny'" in err and f"the model {card_dir}" in err and "encoder 'conch_v1'" in err
    assert not (tmp_path / "e" / "metrics.json").exists()
    # the card of a model trained on these stores lets them through (keys the stores do not record are not compared)
    card["features"]["encoder"] = "conch_tiny"
    (card_dir / CARD_JSON).write_text(json.dumps(card))
    m = evaluate(bench_csv, feats, card_dir, tmp_path / "ok", settings=EvalSettings(max_new_tokens=2), model=model,
                 log=None)
    assert m["n_answered"] == 5
