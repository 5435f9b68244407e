"""Feature stores: Zarr and H5 round trips, SlideChat CSV export/import in SlideChat's own reading style."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from preprocessing.stores import (
    PartialZarrStore,
    StoreError,
    convert_store,
    export_csv,
    export_csv_main,
    import_csv,
    import_csv_main,
    load_features,
    seal_store,
    write_h5_store,
    write_zarr_store,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n, d = 37, 16
    feats = rng.normal(0, 3, (n, d)).astype(np.float32)
    coords = np.stack([rng.integers(0, 50000, n), rng.integers(0, 40000, n)], 1).astype(np.int64)
    valid = np.ones(n, bool)
    valid[[3, 20]] = False
    return feats, coords, valid


def test_zarr_round_trip_keeps_valid_rows_in_order(data, tmp_path):
    feats, coords, valid = data
    out = write_zarr_store(tmp_path / "s1.zarr", feats, coords, valid, {"encoder": "x", "slide_id": "s1"}, chunk_rows=8)
    import zarr

    g = zarr.open_group(str(out), mode="r")
    assert str(g["features"].dtype) == "float16" and g["features"].chunks == (8, 16)
    assert g.attrs["complete"] is True
    fs = load_features(out)
    assert fs.slide_id == "s1" and fs.attrs["encoder"] == "x"
    np.testing.assert_array_equal(fs.coords, coords[valid])
    np.testing.assert_allclose(fs.features, feats[valid], rtol=1e-3, atol=1e-2)  # float16 storage
    assert fs.features.dtype == np.float32 and fs.coords.dtype == np.int64
    exact = load_features(write_zarr_store(tmp_path / "s2.zarr", feats, coords, None, {}, dtype="float32"))
    np.testing.assert_array_equal(exact.features, feats)


def test_float16_overflow_is_refused(tmp_path):
    coords = np.zeros((2, 2), np.int64)
    with pytest.raises(StoreError, match="float32"):
        write_zarr_store(tmp_path / "o.zarr", np.full((2, 4), 1e6, np.float32), coords, None, {})
    assert not (tmp_path / "o.zarr").exists()


def test_partial_store_markers(data, tmp_path):
    feats, coords, valid = data
    p = PartialZarrStore.create(tmp_path / ".s.partial.zarr", coords, 16, "float32", 10, {"encoder": "x"})
    assert p.n_chunks == 4 and p.done_chunks() == set()
    p.write_chunk(2, feats[20:30], valid[20:30], {"errors": [{"index": 20}]})
    again = PartialZarrStore(tmp_path / ".s.partial.zarr")  # as after a restart
    assert again.done_chunks() == {2} and again.marker_infos() == {2: {"errors": [{"index": 20}]}}
    np.testing.assert_array_equal(np.asarray(again.group["features"][20:30]), feats[20:30])
    with pytest.raises(StoreError, match=r"chunks \[0, 1, 3\] were never written"):
        again.seal()


def test_h5_layout_drops_invalid_rows_and_lists_them(data, tmp_path):
    feats, coords, valid = data
    out = write_h5_store(tmp_path / "s1.h5", feats, coords, valid, {"encoder": "x", "transform_spec": {"size": 224}},
                         {"patch_size": 224, "patch_level": 0})
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (35, 16) and f["features"].dtype == np.float32
        assert f["coords"].attrs["patch_size"] == 224 and f["coords"].attrs["patch_level"] == 0
        np.testing.assert_array_equal(f["coords"][:], coords[valid])
    fs = load_features(out)
    np.testing.assert_array_equal(fs.features, feats[valid])
    assert fs.attrs["invalid_indices"] == [3, 20] and fs.attrs["transform_spec"] == {"size": 224}
    assert fs.attrs["coords_attrs"]["patch_size"] == 224


def test_trident_style_h5_without_our_attrs(tmp_path):
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f.create_dataset("features", data=np.ones((1, 5, 8), np.float32))  # (1, N, D) as some tools save
        f.create_dataset("coords", data=np.arange(10).reshape(5, 2))
    fs = load_features(tmp_path / "t.h5")
    assert fs.features.shape == (5, 8) and fs.slide_id == "t"


def test_slidechat_csv_export_reads_like_slidechat(data, tmp_path):
    feats, coords, valid = data
    feats512 = np.random.default_rng(1).normal(0, 1, (len(coords), 512)).astype(np.float32)
    store = write_zarr_store(tmp_path / "TCGA-XX.zarr", feats512, coords, valid, {"encoder": "conch_v1"}, dtype="float32")
    out = export_csv(store, tmp_path / "TCGA-XX.csv")
    header = out.read_text().splitlines()[0]
    assert header == ",".join([str(i) for i in range(512)] + ["patch_name"])
    df = pd.read_csv(out)
    image = df.iloc[:, :512].to_numpy()  # SlideChat's dataset code: pd.read_csv(f).iloc[:, :512]
    np.testing.assert_array_equal(image.astype(np.float32), feats512[valid])  # float32 values round-trip exactly
    x, y = coords[valid][0]
    assert df["patch_name"][0] == f"{x}_{y}.jpeg"
    back = import_csv(out, tmp_path / "back" / "TCGA-XX.zarr")
    fs = load_features(back)
    np.testing.assert_array_equal(fs.features, feats512[valid])
    np.testing.assert_array_equal(fs.coords, coords[valid])
    assert fs.attrs["source"] == "slidechat_csv" and fs.attrs["encoder"] == "conch_v1" and fs.slide_id == "TCGA-XX"


def test_import_tolerates_index_column_and_missing_patch_names(tmp_path):
    feats = np.arange(24, dtype=np.float32).reshape(3, 8) / 7
    df = pd.DataFrame(feats, columns=[str(i) for i in range(8)])
    df["patch_name"] = ["10_20.jpeg", "TCGA-AB/30_40.jpg", "50_60.png"]
    df.to_csv(tmp_path / "a.csv")  # with the pandas index column ("Unnamed: 0" on reading)
    fs = load_features(tmp_path / "a.csv")
    np.testing.assert_allclose(fs.features, feats, rtol=1e-6)
    np.testing.assert_array_equal(fs.coords, [[10, 20], [30, 40], [50, 60]])
    df.drop(columns=["patch_name"]).to_csv(tmp_path / "b.csv", index=False)
    fs = load_features(tmp_path / "b.csv")
    assert fs.attrs["has_coords"] is False and (fs.coords == -1).all()
    bad = df.copy()
    bad["patch_name"] = ["nope", "1_2.jpeg", "3_4.jpeg"]
    bad.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(StoreError, match="patch_name"):
        load_features(tmp_path / "c.csv")


def test_csv_cli_commands_and_conversion(data, tmp_path, capsys):
    feats, coords, valid = data
    store = write_zarr_store(tmp_path / "s.zarr", feats, coords, valid, {"encoder": "e"}, dtype="float32")
    assert export_csv_main([str(store), str(tmp_path / "s.csv")]) == 0
    assert import_csv_main([str(tmp_path / "s.csv"), str(tmp_path / "h" / "s.h5"), "--encoder", "e2"]) == 0
    fs = load_features(tmp_path / "h" / "s.h5")
    np.testing.assert_array_equal(fs.features, feats[valid])
    assert fs.attrs["encoder"] == "e2"
    h5 = convert_store(store, tmp_path / "c" / "s.h5")
    np.testing.assert_array_equal(load_features(h5).features, feats[valid])
    from preprocessing.__main__ import main as preprocessing_cli

    assert preprocessing_cli(["export-csv", str(tmp_path / "missing.zarr"), str(tmp_path / "m.csv")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unknown_store_type(tmp_path):
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(StoreError, match="unknown feature store type"):
        load_features(tmp_path / "x.parquet")


# --------------------------------------------------------------------------------------------------
# Stores prove they are complete when read
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def sealed(data, tmp_path):
    """A 37-row Zarr store in chunks of 8 rows (blocks 0..7, 8..15, 16..23, 24..31, 32..36)."""
    feats, coords, valid = data
    return write_zarr_store(tmp_path / "S1.zarr", feats, coords, valid, {"slide_id": "S1"}, dtype="float32", chunk_rows=8)


def _flip(path, offset):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_lost_or_changed_chunks_are_refused_naming_rows(sealed, data):
    feats, coords, valid = data
    before = load_features(sealed)
    np.testing.assert_array_equal(before.features, feats[valid])  # an undamaged store reads as written
    chunk = sealed / "features" / "c" / "1" / "0"
    saved = chunk.read_bytes()
    chunk.unlink()  # Zarr would silently return zeros for rows 8..15
    with pytest.raises(StoreError) as e:
        load_features(sealed)
    msg = str(e.value)
    assert str(sealed) in msg and "features rows 8..15 differ" in msg and "re-run feature extraction for slide S1" in msg
    chunk.write_bytes(saved)
    _flip(chunk, len(saved) // 2)  # still decodes, other values
    with pytest.raises(StoreError, match=r"features rows 8\.\.15 differ"):
        load_features(sealed)
    _flip(chunk, 5)  # the zstd frame header: no longer decodes
    with pytest.raises(StoreError, match=r"features rows 8\.\.15 cannot be decoded"):
        load_features(sealed)
    chunk.write_bytes(saved)
    (sealed / "valid" / "c" / "4").unlink()  # rows 32..36 would silently drop out
    with pytest.raises(StoreError, match=r"valid rows 32\.\.36 differ"):
        load_features(sealed)


def test_lost_coords_chunk_is_refused(sealed):
    (sealed / "coords" / "c" / "0" / "0").unlink()  # all coords would read (0, 0)
    with pytest.raises(StoreError, match=r"S1\.zarr: damaged feature store of slide S1: coords rows 0\.\.36 differ"):
        load_features(sealed)


def test_nan_features_are_refused_naming_rows(sealed, data, tmp_path):
    import zarr

    g = zarr.open_group(str(sealed), mode="r+")
    g["features"][5, 3] = np.nan
    with pytest.raises(StoreError, match=r"features rows 0\.\.7 differ"):
        load_features(sealed)  # our store: the checksum no longer matches
    feats, coords, valid = data
    bad = feats.copy()
    bad[[4, 9]] = np.inf
    with h5py.File(tmp_path / "clam.h5", "w") as f:  # another tool's H5: no checksums, values still checked
        f.create_dataset("features", data=bad)
        f.create_dataset("coords", data=coords)
    with pytest.raises(StoreError, match=r"clam\.h5: 2 patch row\(s\) of slide clam hold NaN/inf features \(rows 4, 9\)"):
        load_features(tmp_path / "clam.h5")
    df = pd.DataFrame(bad[:6], columns=[str(i) for i in range(bad.shape[1])])
    df.to_csv(tmp_path / "sc.csv", index=False)
    with pytest.raises(StoreError, match=r"sc\.csv: 1 patch row\(s\) of slide sc hold NaN/inf features \(rows 4\)"):
        load_features(tmp_path / "sc.csv")


def test_our_h5_store_is_checked_too(data, tmp_path):
    feats, coords, valid = data
    out = write_h5_store(tmp_path / "S2.h5", feats, coords, valid, {"format": "wsi-slidechat-features", "slide_id": "S2"})
    np.testing.assert_array_equal(load_features(out).features, feats[valid])
    with h5py.File(out, "r+") as f:
        f["features"][30, 0] += 1.0
    with pytest.raises(StoreError, match=r"S2\.h5: damaged feature store of slide S2: features rows 0\.\.34 differ"):
        load_features(out)
    out = write_h5_store(tmp_path / "S3.h5", feats, coords, valid, {"format": "wsi-slidechat-features"})
    with h5py.File(out, "r+") as f:  # rows cut off
        x, xy = f["features"][:20], f["coords"][:20]
        del f["features"], f["coords"]
        f["features"], f["coords"] = x, xy
    with pytest.raises(StoreError, match="features has 20 rows, 35 were written"):
        load_features(out)


def test_other_tools_h5_shapes_are_checked(tmp_path):
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f.create_dataset("features", data=np.ones((5, 8), np.float32))
        f.create_dataset("coords", data=np.arange(15).reshape(5, 3))
    with pytest.raises(StoreError, match=r"coords have shape \(5, 3\)"):
        load_features(tmp_path / "t.h5")


def test_zero_patch_stores_read_as_empty(tmp_path):
    empty = np.zeros((0, 2), np.int64)
    for out in (write_zarr_store(tmp_path / "E.zarr", np.zeros((0, 16)), empty, None, {}),
                write_h5_store(tmp_path / "E.h5", np.zeros((0, 16)), empty, None, {})):
        fs = load_features(out)
        assert fs.features.shape == (0, 16) and len(fs) == 0


def test_chunk_lost_before_finalize_is_caught(data, tmp_path):
    feats, coords, valid = data
    p = PartialZarrStore.create(tmp_path / ".s.partial.zarr", coords, 16, "float32", 10, {"slide_id": "s"})
    for i in range(p.n_chunks):
        p.write_chunk(i, feats[i * 10:(i + 1) * 10], valid[i * 10:(i + 1) * 10])
    (tmp_path / ".s.partial.zarr" / "features" / "c" / "2" / "0").unlink()  # e.g. a disk problem before the end
    final = p.finalize(tmp_path / "s.zarr", {"n_valid": int(valid.sum())})
    with pytest.raises(StoreError, match=r"features rows 20\.\.29 differ"):
        load_features(final)


def test_older_store_is_refused_until_sealed(sealed, data, tmp_path, capsys):
    import zarr

    from preprocessing.__main__ import main as preprocessing_cli

    feats, coords, valid = data
    g = zarr.open_group(str(sealed), mode="r+")
    g.attrs.update({"n_valid": int(valid.sum())})
    del g.attrs["integrity"]  # as written before stores carried checksums
    with pytest.raises(StoreError, match=r"without an integrity record.*seal-store"):
        load_features(sealed)
    damaged = tmp_path / "old" / "S1.zarr"
    shutil.copytree(sealed, damaged)
    (damaged / "features" / "c" / "2" / "0").unlink()
    assert preprocessing_cli(["seal-store", str(sealed), str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"refused: {damaged}" in err and "rows 16..23" in err and "1 of 2 store(s) could not be sealed" in err
    np.testing.assert_array_equal(load_features(sealed).features, feats[valid])  # sealed now, values unchanged
    with pytest.raises(StoreError, match="without an integrity record"):
        load_features(damaged)
    (sealed / "coords" / "c" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"coords rows 0\.\.36 differ"):
        load_features(sealed)


def test_older_store_with_nan_is_not_sealed(data, tmp_path):
    import zarr

    feats, coords, valid = data
    out = write_zarr_store(tmp_path / "S4.zarr", feats, coords, valid, {}, dtype="float32", chunk_rows=8)
    g = zarr.open_group(str(out), mode="r+")
    g["features"][6, 1] = np.nan
    del g.attrs["integrity"]
    with pytest.raises(StoreError, match=r"hold NaN/inf features \(rows 6\)"):
        seal_store(out)
