"""Hostile or clumsy data, second round: stores, ids and outputs that used to give a traceback or a
silently wrong number. Each case is built as a user would make it and must fail with one clear error
naming the file (or be counted and reported)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from preprocessing.stores import StoreError, load_features, write_zarr_store


def _store(path: Path, n: int = 50, dim: int = 8, **attrs) -> Path:
    rng = np.random.default_rng(0)
    return write_zarr_store(path, rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, 10_000, (n, 2)),
                            None, {"format": "wsi-slidechat-features", "slide_id": path.stem, **attrs}, chunk_rows=16)


@pytest.mark.parametrize("edit", ["block_rows_zero", "rows_missing", "not_a_record", "checksums_not_a_list"])
def test_edited_integrity_record_is_a_store_error(tmp_path, edit):
    store = _store(tmp_path / "S1.zarr")
    meta = json.loads((store / "zarr.json").read_text())
    record = meta["attributes"]["integrity"]
    if edit == "block_rows_zero":
        record["block_rows"] = 0
    elif edit == "rows_missing":
        del record["rows"]
    elif edit == "not_a_record":
        meta["attributes"]["integrity"] = {"features": "x"}
    else:
        record["features"] = 7
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"{store}: .*integrity record"):
        load_features(store)


def _h5(path: Path, features, coords=None) -> Path:
    with h5py.File(path, "w") as f:
        f["features"] = features
        if coords is not None:
            f["coords"] = coords
    return path


def test_foreign_h5_with_unusable_values_is_refused(tmp_path):
    cases = {
        "text": (np.array([[b"a", b"b"]]), np.zeros((1, 2)), r"features are not numbers \(dtype \|S1\)"),
        "complex": (np.ones((2, 2), np.complex64), np.zeros((2, 2)), r"features are not numbers \(dtype complex64\)"),
        "nan_coords": (np.ones((2, 2)), np.array([[0.0, 1.0], [np.nan, 2.0]]), r"coords .*row 1"),
        "fractional_coords": (np.ones((2, 2)), np.array([[0.5, 1.0], [3.0, 2.0]]), r"coords .*row 0"),
        "duplicate_coords": (np.ones((3, 2)), np.array([[0, 0], [7, 7], [0, 0]]), r"2 rows at the same coordinates"),
    }
    for name, (feats, coords, message) in cases.items():
        f = _h5(tmp_path / f"{name}.h5", feats, coords)
        with pytest.raises(StoreError, match=rf"{f}: {message}"):
            load_features(f)
    # CLAM's own layout (float32 features, int64 coords) still reads
    ok = _h5(tmp_path / "ok.h5", np.ones((2, 3), np.float32), np.array([[0, 0], [256, 0]]))
    assert load_features(ok).coords.tolist() == [[0, 0], [256, 0]]


def test_slidechat_csv_with_a_patch_listed_twice_is_refused(tmp_path):
    f = tmp_path / "S1.csv"
    f.write_text("0,1,patch_name\n1,2,0_0.jpeg\n3,4,224_0.jpeg\n1,2,0_0.jpeg\n")
    with pytest.raises(StoreError, match=rf"{f}: 2 rows at the same coordinates \(0, 0\)"):
        load_features(f)
    f.write_text("0,1\n1,2\n1,2\n")  # without patch names there are no coordinates to compare
    assert len(load_features(f)) == 2


# ----------------------------------------------------------------------------- stores of another encoder


def _records(tmp_path: Path, slides: list[str]) -> Path:
    records = [{"id": f"r{i}", "image": [f"{s}.zarr"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Glands."}]}
        for i, s in enumerate(slides)]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    return path


def test_build_instructions_refuses_a_features_dir_mixing_encoders(tmp_path):
    from slidechat.instructions import build_instructions

    feats = tmp_path / "features"
    _store(feats / "S1.zarr", encoder="conch_v1", patch_size=224, target_mpp=0.5)
    _store(feats / "S2.zarr", encoder="conch_v1", patch_size=224, target_mpp=0.5)
    _store(feats / "S3.zarr", encoder="uni_v1", patch_size=224, target_mpp=0.5)  # copied in from another run
    records = _records(tmp_path, ["S1", "S2", "S3"])
    with pytest.raises(StoreError, match=r"S3\.zarr.*encoder 'uni_v1'.*S1\.zarr.*'conch_v1'"):
        build_instructions(records, feats, tmp_path / "train.json")
    (feats / "S3.zarr").rename(tmp_path / "S3.zarr")
    _store(feats / "S3.zarr", encoder="conch_v1", patch_size=256, target_mpp=0.5)  # same encoder, other patches
    with pytest.raises(StoreError, match=r"patch_size 256"):
        build_instructions(records, feats, tmp_path / "train.json")
    import shutil

    shutil.rmtree(feats / "S3.zarr")
    _store(feats / "S3.zarr", encoder="conch_v1", patch_size=224, target_mpp=0.5)
    assert build_instructions(records, feats, tmp_path / "train.json")["counts"]["kept"] == 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_llm):
    import torch

    from slidechat.checkpoint import new_model, save_model
    from slidechat.model import SlideChatConfig

    torch.manual_seed(0)
    cfg = SlideChatConfig(feature_dim=8, encoder_layers=1, encoder_ffn_dim=16, encoder_heads=2,
                          segment_lengths=[16, 32], dilated_ratios=[1, 2])
    return save_model(new_model(tiny_llm, cfg), tmp_path_factory.mktemp("m") / "model")


def _bench(tmp_path: Path, slides: list[str], ids: list[str] | None = None) -> Path:
    """A SlideBench TCGA CSV with one question (answer A) per slide; ids 0, 1, ... unless given."""
    import csv

    from slidechat.benchmarks_io import TCGA_COLUMNS

    path = tmp_path / "bench.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(TCGA_COLUMNS)
        for i, s in enumerate(slides):
            w.writerow([ids[i] if ids else i, s, "DEMO", "Diagnosis", "Tissue", f"Q{i}?", "a", "b", "c", "d", "A"])
    return path


def test_evaluate_refuses_stores_of_another_encoder_or_width(tiny_model, tmp_path, capsys):
    from slidechat.cli import main as cli

    feats = tmp_path / "features"
    _store(feats / "S1.zarr", encoder="conch_v1")
    _store(feats / "S2.zarr", encoder="uni_v1")
    bench = _bench(tmp_path, ["S1", "S2"])
    argv = ["evaluate", "--benchmark", str(bench), "--model", str(tiny_model), "--max-new-tokens", "2",
            "--device", "cpu"]
    assert cli(argv + ["--features-dir", str(feats), "--out-dir", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "S2.zarr" in err and "'uni_v1'" in err and "'conch_v1'" in err
    wide = tmp_path / "wide"
    _store(wide / "S1.zarr", dim=16, encoder="conch_v1")  # 16-d features for a model of 8-d ones
    assert cli(argv + ["--features-dir", str(wide), "--out-dir", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{wide / 'S1.zarr'} holds 16-d features" in err and "8-d" in err


def test_training_data_naming_an_empty_or_wrong_width_store_fails_naming_it(tiny_llm, tmp_path):
    from transformers import AutoTokenizer

    from slidechat.train import InstructionDataset

    empty = write_zarr_store(tmp_path / "EMPTY.zarr", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64), None,
                             {"slide_id": "EMPTY"})
    wide = _store(tmp_path / "WIDE.zarr", dim=16)
    good = _store(tmp_path / "GOOD.zarr", dim=8)
    turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Glands."}]
    records = [{"id": s.stem, "image": [s.name], "slide_id": s.stem, "features": str(s), "conversations": turns}
               for s in (good, empty, wide)]
    data = InstructionDataset(records, AutoTokenizer.from_pretrained(tiny_llm), feature_dim=8)
    assert data[0]["features"].shape == (50, 8)
    with pytest.raises(StoreError, match=rf"{empty}: .*no patches.*record EMPTY"):
        data[1]
    with pytest.raises(StoreError, match=rf"{wide} holds 16-d features.*8-d"):
        data[2]


def test_ask_on_a_slide_without_tissue_is_a_clear_error(tiny_model, cmu_crop_16, tmp_path, capsys):
    from slidechat.cli import main as cli

    empty = write_zarr_store(tmp_path / "EMPTY.zarr", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64), None,
                             {"slide_id": "EMPTY"})
    argv = ["ask", "--slide", str(cmu_crop_16), "--question", "What is shown?", "--checkpoint", str(tiny_model),
            "--encoder", "conch_tiny", "--work-dir", str(tmp_path / "cache"), "--device", "cpu"]
    for extra in ([], ["--features", str(empty)]):
        capsys.readouterr()
        assert cli(argv + extra) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("no tissue patches" in err or f"{empty}: holds no patches" in err), err


# ----------------------------------------------------------------------------- outputs and ids


def test_outputs_whose_ids_lost_leading_zeros_still_match(tmp_path, capsys):
    from slidechat.cli import main as cli

    bench = _bench(tmp_path, ["S0", "S1", "S2"], ids=["001", "002", "010"])
    (tmp_path / "o.csv").write_text("ID,Output\n1,A\n2,B\n10, A\n")  # saved again by a spreadsheet
    assert cli(["score", "--benchmark", str(bench), "--outputs", str(tmp_path / "o.csv"),
                "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["n_answered"], m["correct"], m["n_missing_output"]) == (3, 2, 0)


def test_outputs_of_another_benchmark_are_an_error_not_zero_accuracy(tmp_path, capsys):
    from slidechat.cli import main as cli

    bench = _bench(tmp_path, ["S0", "S1", "S2"], ids=["q1", "q2", "q3"])
    (tmp_path / "o.csv").write_text("ID,Output\nBRCA:1,A\nBRCA:2,B\n")
    assert cli(["score", "--benchmark", str(bench), "--outputs", str(tmp_path / "o.csv"),
                "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'o.csv'}: none of its 2 question IDs" in err and "BRCA:1" in err
    assert not (tmp_path / "m.json").exists()


# ----------------------------------------------------------------------------- leakage guard


def test_leakage_guard_sees_a_tcga_barcode_behind_a_suffix(tmp_path):
    from slidechat.instructions import build_instructions
    from slidechat.scoring import leakage_check
    from slidechat.benchmarks_io import load_benchmark

    barcode = "TCGA-A7-A0CJ-01Z-00-DX2"
    feats = tmp_path / "features"
    names = [f"{barcode}_features", f"{barcode.lower()}-copy", "TCGA-AR-A255-01Z-00-DX1"]
    for n in names:
        _store(feats / f"{n}.zarr", encoder="conch_v1")
    bench = _bench(tmp_path, [barcode])
    m = build_instructions(_records(tmp_path, names), feats, tmp_path / "train.json", exclude_benchmarks=[bench])
    assert m["counts"]["kept"] == 1 and m["counts"]["leakage_removed"] == 2
    # the evaluation's check sees the same through a training JSON that kept such a name
    train = tmp_path / "old-train.json"
    train.write_text(json.dumps([{"slide_id": f"{barcode}_features", "image": [f"{barcode}_features.zarr"]}]))
    assert leakage_check(load_benchmark(bench), [train])["slides"] == [barcode]


@pytest.mark.parametrize("content", [b'{"samples": [', b"\xff\xfe\x00 not text", b'{"samples": 5}', b"[1, 2]",
                                     b'{"samples": [{"slide_id": "S1", "question": "q", "choices": 3, "answer": "A"}]}',
                                     b"[" * 100_000 + b"]" * 100_000], ids=["cut", "binary", "shape", "list",
                                                                             "choices", "deep"])
def test_unreadable_benchmark_files_are_one_line_errors(tmp_path, capsys, content):
    from slidechat.cli import main as cli
    from slidechat.instructions import build_instructions

    suffix = ".csv" if content.startswith(b"\xff") else ".json"
    bench = tmp_path / f"bench{suffix}"
    bench.write_bytes(content)
    (tmp_path / "o.csv").write_text("ID,Output\n1,A\n")
    assert cli(["score", "--benchmark", str(bench), "--outputs", str(tmp_path / "o.csv"),
                "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(bench) in err, err
    _store(tmp_path / "f" / "S1.zarr")
    from wsicore.errors import InputError

    if content.startswith(b'{"samples": [{'):  # its slide ids can still be read: the guard uses them
        with pytest.raises(InputError, match="removed by the leakage guard"):
            build_instructions(_records(tmp_path, ["S1"]), tmp_path / "f", tmp_path / "t.json",
                               exclude_benchmarks=[bench])
        return
    with pytest.raises(InputError, match=str(bench)):  # a leakage-guard input that names no slide is an error
        build_instructions(_records(tmp_path, ["S1"]), tmp_path / "f", tmp_path / "t.json", exclude_benchmarks=[bench])


def test_unreadable_store_folder_slide_map_and_outputs_are_one_line_errors(tiny_model, tmp_path, capsys):
    from slidechat.cli import main as cli

    feats = tmp_path / "features"
    (feats / "S1.zarr").mkdir(parents=True)  # a store folder whose files are gone (a failed copy)
    bench = _bench(tmp_path, ["S1"])
    argv = ["evaluate", "--benchmark", str(bench), "--model", str(tiny_model), "--out-dir", str(tmp_path / "e"),
            "--max-new-tokens", "2", "--device", "cpu"]
    assert cli(argv + ["--features-dir", str(feats)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(feats / "S1.zarr") in err, err
    binary = tmp_path / "map.csv"
    binary.write_bytes(b"\xff\xfeslide,features\n")  # UTF-16 from a spreadsheet's "save as"
    assert cli(argv + ["--features-dir", str(tmp_path), "--slide-map", str(binary)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(binary) in err, err
    assert cli(["score", "--benchmark", str(bench), "--outputs", str(binary), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(binary) in err, err


def test_leakage_guard_sees_an_evaluation_slides_store_behind_another_name(tmp_path):
    from slidechat.instructions import build_instructions

    barcode = "TCGA-A7-A0CJ-01Z-00-DX2"
    feats = tmp_path / "features"
    store = _store(feats / f"{barcode}.zarr", encoder="conch_v1")
    _store(feats / "S2.zarr", encoder="conch_v1")
    smap = tmp_path / "map.csv"  # a map (or a sample sheet) that calls the evaluation slide's store "patient-9"
    smap.write_text(f"image,features\npatient-9.svs,{store}\n")
    bench = _bench(tmp_path, [barcode])
    m = build_instructions(_records(tmp_path, ["patient-9", "S2"]), feats, tmp_path / "train.json",
                           exclude_benchmarks=[bench], slide_map=smap)
    assert m["counts"]["kept"] == 1 and m["dropped"]["leakage"][0]["id"] == "r0"


# ----------------------------------------------------------------------------- coords files


@pytest.mark.parametrize("recorded", ["../escaped", "/tmp/elsewhere/escaped", "..", ""])
def test_coords_file_whose_slide_id_is_a_path_cannot_place_a_store_outside_the_output(cmu_small, tmp_path, recorded):
    import shutil

    from preprocessing.extract import read_coords
    from preprocessing.tiling import tile_slide

    coords = tile_slide(cmu_small, tmp_path / "tiles", target_mpp=4.0)
    hostile = tmp_path / "CMU-1-Small-Region.h5"
    shutil.copy(coords, hostile)
    with h5py.File(hostile, "r+") as f:
        f["coords"].attrs["slide_id"] = recorded
    if recorded == "":  # nothing recorded: the file's own name is the id
        assert read_coords(hostile).slide_id == "CMU-1-Small-Region"
        return
    with pytest.raises(StoreError, match=rf"{hostile}: records slide_id {recorded!r}, which is not a file name"):
        read_coords(hostile)


# ----------------------------------------------------------------------------- model outputs


def test_a_degenerate_answer_full_of_whitespace_is_scored_at_once(tmp_path):
    """LLMs can emit long runs of blank lines; the letter extractor's patterns backtracked cubically on them
    (1,000 spaces after 'The answer' took 18 s, 20,000 would take days). Run apart, so a regression fails
    the test instead of hanging the suite."""
    import subprocess
    import sys

    code = ("from slidechat.scoring import extract_answer\n"
            "opts = {'A': 'adenocarcinoma', 'B': 'lymphoid', 'C': 'stroma', 'D': 'necrosis'}\n"
            "for ws in (' ', '\\n', ' \\n'):\n"
            "    for text in ('The answer' + ws * 20000 + 'unclear', '\\\\boxed{' + ws * 20000 + 'x',\n"
            "                 'The answer is' + ws * 20000 + '(B)'):\n"
            "        print(extract_answer(text, opts))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["None", "None", "B"] * 3


def test_zarr_metadata_claiming_more_rows_than_written_is_refused_before_reading(tmp_path):
    store = _store(tmp_path / "S1.zarr")
    meta_file = store / "features" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    original = json.dumps(meta)
    meta["shape"][0] = 10 ** 12  # reading it would first allocate the claimed array
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"{store}: .*features has {10 ** 12} rows, 50 were written"):
        load_features(store)
    meta = json.loads(original)
    meta["shape"][1] = 10 ** 9  # 50 rows of a billion features each
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"{store}: .*array shapes features \(50, {10 ** 9}\)"):
        load_features(store)


def test_h5_dataset_claiming_far_more_than_it_stores_is_refused_before_reading(tmp_path):
    f = tmp_path / "S1.h5"
    with h5py.File(f, "w") as h:  # 2 TB claimed, nothing written: reading fills it with zeros first
        h.create_dataset("features", shape=(10 ** 9, 512), dtype="float32", chunks=(1024, 512))
        h.create_dataset("coords", shape=(10 ** 9, 2), dtype="int64", chunks=(1024, 2))
    assert f.stat().st_size < 100_000
    with pytest.raises(StoreError, match=rf"{f}: features claim 2,048,000,000,000 bytes but the file stores 0"):
        load_features(f)
