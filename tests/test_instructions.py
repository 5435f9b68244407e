"""Instruction assembly (real SlideInstruction example + SlideBench leakage guard) and demo data."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from preprocessing.stores import normalize_slide_id, write_zarr_store
from slidechat import demo_data, instructions
from slidechat.benchmarks_io import benchmark_slide_ids
from slidechat.cli import main as cli
from slidechat.instructions import InstructionSettings, build_instructions
from wsicore.errors import InputError

EXAMPLE_IDS = ["TCGA-A7-A0CJ-01Z-00-DX2", "TCGA-AR-A255-01Z-00-DX1", "TCGA-A7-A6VV-01Z-00-DX2"]


def _fake_store(path: Path) -> None:
    """A feature file of the released SlideChat CSV layout (512 feature columns + patch_name)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([str(i) for i in range(512)] + ["patch_name"])
        w.writerow([0.0] * 512 + ["0_0.jpeg"])


def _zarr_store(path: Path, n: int = 3) -> Path:
    """One of our Zarr stores with `n` patches (0: a slide without tissue)."""
    coords = np.stack([np.arange(n), np.zeros(n)], 1).astype(np.int64) * 224
    return write_zarr_store(path, np.random.default_rng(n).normal(size=(n, 8)), coords, None, {"slide_id": path.stem},
                            chunk_rows=2)


def test_normalize_slide_id() -> None:
    assert normalize_slide_id("TCGA-A7-A0CJ-01Z-00-DX2.csv") == "TCGA-A7-A0CJ-01Z-00-DX2"
    assert normalize_slide_id("TCGA-LUSC/TCGA-21-1083-01Z-00-DX1.8288ca92-b611-4acf.pt") == "TCGA-21-1083-01Z-00-DX1"
    assert normalize_slide_id("feats/demo-003.zarr") == "demo-003"
    assert normalize_slide_id("my.slide.name.h5") == "my.slide.name"


def test_real_example_missing_slides_and_leakage(vlm_data: Path, tmp_path: Path) -> None:
    example = vlm_data / "slidechat_train_data_example.json"
    feats = tmp_path / "features"
    feats.mkdir()
    # Features for two of the three slides; the third is missing.
    _zarr_store(feats / f"{EXAMPLE_IDS[0]}.zarr")
    _fake_store(feats / f"{EXAMPLE_IDS[1]}.csv")
    # A SlideBench-format CSV that lists slide 0 as an evaluation slide.
    bench_csv = tmp_path / "bench.csv"
    with open(bench_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer"])
        w.writerow([0, EXAMPLE_IDS[0], "BRCA", "Diagnosis", "x", "q?", "a", "b", "c", "d", "A"])
    out = tmp_path / "train.json"
    m = build_instructions(example, feats, out, exclude_benchmarks=[bench_csv, vlm_data / "slidebench_vqa_tcga_1494.json"],
                           settings=InstructionSettings(max_missing_fraction=0.5))
    kept = json.loads(out.read_text())
    assert [r["slide_id"] for r in kept] == [EXAMPLE_IDS[1]]
    assert kept[0]["features"].endswith(f"{EXAMPLE_IDS[1]}.csv")
    assert kept[0]["conversations"][0]["value"].count("<image>") == 1
    c = m["counts"]
    assert (c["input"], c["kept"], c["missing_features"], c["leakage_removed"], c["malformed"]) == (3, 1, 1, 1, 0)
    assert m["dropped"]["missing_features"][0]["slide_id"] == EXAMPLE_IDS[2]
    assert m["dropped"]["leakage"][0]["slide_id"] == EXAMPLE_IDS[0]
    assert m["exclude_benchmarks"][1]["slides"] == 591
    on_disk = json.loads(instructions.manifest_path(out).read_text())
    assert on_disk["counts"] == c and on_disk["inputs"][0]["sha256"] == instructions.sha256_file(example)


def test_slidebench_json_slides_are_excluded(vlm_data: Path, tmp_path: Path) -> None:
    bench = vlm_data / "slidebench_vqa_tcga_1494.json"
    sid = json.loads(bench.read_text())["samples"][0]["slide_id"]
    assert sid in benchmark_slide_ids(bench)
    feats = tmp_path / "f"
    feats.mkdir()
    records = [{"id": f"r{i}", "image": [f"{s}.csv"], "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]} for i, s in enumerate([sid, "other"])]
    for s in (sid, "other"):
        _fake_store(feats / f"{s}.csv")
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records))
    m = build_instructions(src, feats, tmp_path / "o.json", exclude_benchmarks=[bench])
    assert m["counts"]["kept"] == 1 and m["dropped"]["leakage"] == [{"id": "r0", "slide_id": sid}]


def test_malformed_records_listed_not_fatal(tmp_path: Path) -> None:
    feats = tmp_path / "f"
    feats.mkdir()
    _fake_store(feats / "s1.csv")
    good = {"id": "ok", "image": ["s1.csv"], "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "more?"}, {"from": "gpt", "value": "b"}]}
    bad = [
        {"id": "no-image-token", "image": ["s1.csv"], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "two-slides", "image": ["s1.csv", "s2.csv"], "conversations": good["conversations"]},
        {"id": "order", "image": ["s1.csv"], "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "a"}]},
        {"id": "dangling", "image": ["s1.csv"], "conversations": good["conversations"][:3]},
        "not a record",
    ]
    src = tmp_path / "in.json"
    src.write_text(json.dumps([good, *bad]))
    m = build_instructions(src, feats, tmp_path / "o.json")
    assert m["counts"]["kept"] == 1
    assert [d["id"] for d in m["dropped"]["malformed"]] == ["no-image-token", "two-slides", "order", "dangling", "#5"]


def test_slide_map_other_naming(tmp_path: Path) -> None:
    feats = tmp_path / "f"
    (feats / "BRCA").mkdir(parents=True)
    _fake_store(feats / "BRCA" / "slide-7.csv")  # one folder deep, as in TCGA_patch_feat/<TUMOR>/
    smap = tmp_path / "map.csv"
    smap.write_text("image,slide_id\ncase_7_scan.svs,slide-7\n")
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"id": "x", "image": "case_7_scan.svs", "conversations": [
        {"from": "human", "value": "q <image>"}, {"from": "gpt", "value": "a"}]}]))
    m = build_instructions(src, feats, tmp_path / "o.json", slide_map=smap)
    assert m["counts"]["kept"] == 1
    assert json.loads((tmp_path / "o.json").read_text())[0]["slide_id"] == "slide-7"


def _labels(tmp_path: Path, per_class_train: int = 4, per_class_test: int = 3) -> Path:
    path = tmp_path / "labels.csv"
    rows = []
    for c in ("adenocarcinoma", "lymphoid", "stroma"):
        rows += [(c, "train")] * per_class_train + [(c, "test")] * per_class_test
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "class_name", "split", "mpp"])
        for i, (c, s) in enumerate(rows):
            w.writerow([f"demo-{i:03d}", f"/x/demo-{i:03d}.svs", c, s, 0.25])
    return path


def test_demo_instructions(tmp_path: Path) -> None:
    labels = _labels(tmp_path)
    paths = demo_data.make_demo_instructions(labels, tmp_path / "out", seed=3)
    with open(labels) as fh:
        split = {r["slide_id"]: r for r in csv.DictReader(fh)}
    caps = json.loads(paths["stage1"].read_text())
    vqa = json.loads(paths["stage2"].read_text())
    for rec in caps + vqa:
        assert instructions.validate_record(rec) is None
        assert split[normalize_slide_id(rec["image"][0])]["split"] == "train"
    # Multiple-choice answers: the letter points at the class's option; letters balanced.
    letters = Counter()
    for rec in vqa:
        prompt, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        if "\nA. " not in prompt:
            continue
        options = dict(line.split(". ", 1) for line in prompt.split("\n")[2:])
        text = answer.rstrip(".")
        letter = next(k for k, v in options.items() if v == text)  # exactly one option carries the answer
        assert sum(v == text for v in options.values()) == 1
        cls = split[normalize_slide_id(rec["image"][0])]["class_name"]
        assert text in (demo_data.CLASS_TEXT[cls].diagnosis, demo_data.CLASS_TEXT[cls].morphology)
        letters[letter] += 1
    assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1
    with open(paths["benchmark"]) as fh:
        bench = list(csv.DictReader(fh))
    assert {b["Slide"] for b in bench} == {s for s, r in split.items() if r["split"] == "test"}
    counts = Counter(b["Answer"] for b in bench)
    assert max(counts.values()) / len(bench) <= 0.3  # majority-letter baseline stays near 25%
    for b in bench:
        cls = split[b["Slide"]]["class_name"]
        assert b[b["Answer"]] in (demo_data.CLASS_TEXT[cls].diagnosis, demo_data.CLASS_TEXT[cls].morphology)
    # The leakage guard of build-instructions recognises the demo benchmark's slides.
    assert benchmark_slide_ids(paths["benchmark"]) == {b["Slide"] for b in bench}
    assert "Adenocarcinoma" in paths["corpus"].read_text()
    # Deterministic.
    again = demo_data.make_demo_instructions(labels, tmp_path / "again", seed=3)
    assert again["stage2"].read_text() == paths["stage2"].read_text()


def test_demo_rejects_unknown_class(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("slide_id,path,class_name,split,mpp\ns,/x,melanoma,train,0.25\n")
    with pytest.raises(InputError, match="melanoma"):
        demo_data.make_demo_instructions(p, tmp_path / "o")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    labels = _labels(tmp_path, 2, 1)
    assert cli(["demo-instructions", "--labels", str(labels), "--out", str(tmp_path / "d")]) == 0
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in range(0, 9, 2):  # features for some slides only
        _zarr_store(feats / f"demo-{i:03d}.zarr")
    argv = ["build-instructions", "--input", str(tmp_path / "d" / "stage2_vqa.json"), "--features-dir", str(feats),
            "--out", str(tmp_path / "s2.json"), "--exclude-benchmark", str(tmp_path / "d" / "slidebench_demo.csv")]
    assert cli(argv) == 2  # half of the records lost: refused, naming the slides
    err = capsys.readouterr().err
    assert "more than --max-missing-fraction 0.05" in err and "demo-003" in err and "demo-002" not in err
    assert not (tmp_path / "s2.json").exists()
    assert cli(argv + ["--max-missing-fraction", "1"]) == 0
    m = json.loads((tmp_path / "s2.manifest.json").read_text())
    assert m["counts"]["kept"] + m["counts"]["missing_features"] == m["counts"]["input"]
    assert m["counts"]["leakage_removed"] == 0  # the demo VQA holds train slides only
    assert m["settings"] == {"leakage_level": "slide", "max_missing_fraction": 1.0}
    kept = json.loads((tmp_path / "s2.json").read_text())
    assert len(kept) == m["counts"]["kept"] > 0
    assert all(Path(r["features"]) == feats / f"{r['slide_id']}.zarr" for r in kept)


def _example_with_stores(vlm_data: Path, tmp_path: Path, names: list[str], rows: list[str] | None = None):
    feats = tmp_path / "features"
    feats.mkdir()
    for name in names:
        _zarr_store(feats / f"{name}.zarr")
    smap = None
    if rows is not None:
        smap = tmp_path / "map.csv"
        smap.write_text("image,slide_id\n" + "".join(f"{i}.csv,{r}\n" for i, r in zip(EXAMPLE_IDS, rows)))
    return vlm_data / "slidechat_train_data_example.json", feats, smap


def test_lowercase_ids_keep_every_record(vlm_data: Path, tmp_path: Path) -> None:
    """The pipeline names stores after the slide file (`tcga-...-ts1.zarr`); a map to those ids, or none,
    keeps all three of SlideChat's example records."""
    lower = [s.lower() for s in EXAMPLE_IDS]
    example, feats, smap = _example_with_stores(vlm_data, tmp_path, lower, rows=lower)
    for i, slide_map in enumerate((smap, None)):
        m = build_instructions(example, feats, tmp_path / f"o{i}.json", slide_map=slide_map)
        kept = json.loads((tmp_path / f"o{i}.json").read_text())
        assert m["counts"]["kept"] == 3 and m["counts"]["missing_features"] == 0
        assert sorted(Path(r["features"]).name for r in kept) == sorted(f"{s}.zarr" for s in lower)
    # training and evaluation find the same stores by the same rule
    from preprocessing.stores import FeatureStoreIndex

    assert FeatureStoreIndex(feats).find(EXAMPLE_IDS[0]) == feats / f"{lower[0]}.zarr"


def test_sample_sheet_ids_keep_every_record(vlm_data: Path, tmp_path: Path) -> None:
    renamed = ["patient-1", "patient-2", "Patient-3"]  # ids of a sample sheet, not the file names
    example, feats, smap = _example_with_stores(vlm_data, tmp_path, ["patient-1", "patient-2", "patient-3"], renamed)
    m = build_instructions(example, feats, tmp_path / "o.json", slide_map=smap)
    assert m["counts"]["kept"] == 3
    assert [r["slide_id"] for r in json.loads((tmp_path / "o.json").read_text())] == renamed


def test_a_build_that_keeps_nothing_fails(vlm_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    example, feats, _ = _example_with_stores(vlm_data, tmp_path, ["unrelated"])
    rc = cli(["build-instructions", "--input", str(example), "--features-dir", str(feats),
              "--out", str(tmp_path / "o.json"), "--max-missing-fraction", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "no record kept out of 3" in err and EXAMPLE_IDS[2] in err
    assert not (tmp_path / "o.json").exists()


def test_zero_patch_store_is_skipped_and_counted(vlm_data: Path, tmp_path: Path) -> None:
    example, feats, _ = _example_with_stores(vlm_data, tmp_path, EXAMPLE_IDS[:2])
    _zarr_store(feats / f"{EXAMPLE_IDS[2]}.zarr", n=0)  # a slide where no tissue was found
    # a no-tissue slide is a recorded skip: listed and counted, but not a failure under the default limit
    m = build_instructions(example, feats, tmp_path / "o.json")
    assert m["counts"]["kept"] == 2 and m["counts"]["no_patches"] == 1 and m["counts"]["no_patches_slides"] == 1
    assert m["dropped"]["no_patches"][0]["slide_id"] == EXAMPLE_IDS[2]
    assert m["missing_fraction"] == 0.0
    assert [r["slide_id"] for r in json.loads((tmp_path / "o.json").read_text())] == EXAMPLE_IDS[:2]


def test_damaged_store_stops_the_build(vlm_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    example, feats, _ = _example_with_stores(vlm_data, tmp_path, EXAMPLE_IDS)
    (feats / f"{EXAMPLE_IDS[1]}.zarr" / "features" / "c" / "1" / "0").unlink()  # rows 2..3 would read as zeros
    rc = cli(["build-instructions", "--input", str(example), "--features-dir", str(feats), "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "1 feature store(s) failed their check" in err
    assert f"{EXAMPLE_IDS[1]}.zarr: damaged feature store" in err and "features rows 2..2 differ" in err
    assert not (tmp_path / "o.json").exists()
    shutil.rmtree(feats / f"{EXAMPLE_IDS[1]}.zarr")
    with h5py.File(feats / f"{EXAMPLE_IDS[1]}.h5", "w") as f:  # another tool's store with a NaN row
        f["features"] = np.where(np.arange(4)[:, None] == 3, np.nan, np.ones((4, 8)))
        f["coords"] = np.zeros((4, 2), np.int64)
    with pytest.raises(instructions.StoreError, match=r"\.h5: 1 patch row\(s\) of slide .* hold NaN/inf features \(rows 3\)"):
        build_instructions(example, feats, tmp_path / "o.json")
