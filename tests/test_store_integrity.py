"""Files handed to us are checked before they are used: coords of another slide, damaged stores in training."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from preprocessing.__main__ import main as preprocessing_cli
from preprocessing.slide import SlideError, WholeSlide
from preprocessing.stores import write_zarr_store
from preprocessing.tiling import check_coords_slide, load_coords, tile_slide


@pytest.fixture(scope="module")
def cmu_coords(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tile_slide(cmu_small, tmp_path_factory.mktemp("tiles"), target_mpp=0.5, patch_size=224,
                      min_tissue_fraction=0.05)


def test_coords_record_their_slide(cmu_small: Path, cmu_coords: Path) -> None:
    _, attrs = load_coords(cmu_coords)
    with WholeSlide(cmu_small) as ws:
        assert attrs["slide_quickhash"] == ws.properties["openslide.quickhash-1"] and len(attrs["slide_quickhash"]) == 64
        assert (attrs["level0_width"], attrs["level0_height"]) == ws.dimensions == (2220, 2967)


def test_coords_of_another_slide_are_refused(cmu_coords: Path, tcga_jp2k_no_mpp: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    rc = preprocessing_cli(["extract", "--slide", str(tcga_jp2k_no_mpp), "--coords", str(cmu_coords),
                            "--out", str(tmp_path), "--encoder", "conch_tiny", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and len(err.strip().splitlines()) == 1
    assert f"{cmu_coords} was made from slide CMU-1-Small-Region, not from {tcga_jp2k_no_mpp}" in err
    assert "OpenSlide quickhash 6335ea0e6cc5... vs a07b51d43e29..." in err and "level-0 size 2220x2967 vs 4443x3567" in err
    assert err.count("level-0 size") == 1  # CLAM's level_dim at level 0 is the same size: said once
    assert list(tmp_path.iterdir()) == []  # no store named CMU-1-Small-Region holding TCGA pixels


def test_renamed_slide_file_is_the_same_slide(cmu_small: Path, cmu_coords: Path, tmp_path: Path) -> None:
    """A sample sheet may call the slide something else than its file: the file's content decides."""
    renamed = tmp_path / "patient-7.svs"
    shutil.copy(cmu_small, renamed)
    with WholeSlide(renamed) as ws:
        check_coords_slide(load_coords(cmu_coords)[1], ws, cmu_coords)


def test_coords_without_identity_are_checked_by_size(cmu_small: Path, tcga_jp2k_no_mpp: Path, cmu_coords: Path,
                                                     tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = tmp_path / "CMU-1-Small-Region.h5"  # as tiling wrote it before, or CLAM: level_dim of the patch level
    shutil.copy(cmu_coords, old)
    with h5py.File(old, "r+") as f:
        for key in ("slide_quickhash", "level0_width", "level0_height"):
            del f["coords"].attrs[key]
    attrs = load_coords(old)[1]
    with WholeSlide(cmu_small) as ws, caplog.at_level(logging.WARNING, "preprocessing.tiling"):
        check_coords_slide(attrs, ws, old)
    assert "records no slide identity" in caplog.text
    with WholeSlide(tcga_jp2k_no_mpp) as ws, pytest.raises(SlideError, match="level-0 size 2220x2967 vs 4443x3567"):
        check_coords_slide(attrs, ws, old)


def test_damaged_store_is_refused_by_train(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_llm: Path) -> None:
    from slidechat.cli import main as slidechat_cli

    llm = tiny_llm
    feats = tmp_path / "features"
    rng = np.random.default_rng(0)
    store = write_zarr_store(feats / "s0.zarr", rng.normal(size=(10, 16)), np.arange(20).reshape(10, 2), None,
                             {"slide_id": "s0"}, chunk_rows=4)
    (store / "features" / "c" / "1" / "0").unlink()  # rows 4..7 would train on zeros
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "r0", "image": ["s0.zarr"], "slide_id": "s0", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the slide."}, {"from": "gpt", "value": "Glands."}]}]))
    model = {"feature_dim": 16, "encoder_layers": 1, "encoder_ffn_dim": 32, "encoder_heads": 2,
             "segment_lengths": [8], "dilated_ratios": [1]}
    rc = slidechat_cli(["train", "--stage", "1", "--data", str(data), "--features-dir", str(feats), "--llm", str(llm),
                        "--out", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"), "--max-steps", "1",
                        "--model-config", json.dumps(model)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{store}: damaged feature store of slide s0: features rows 4..7 differ" in err
    assert not (tmp_path / "model").exists()
