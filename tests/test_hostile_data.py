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
