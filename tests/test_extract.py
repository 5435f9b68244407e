"""Batched extraction: stores match the coords row for row, resume after a kill, corrupt tiles, real slide."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from preprocessing.encoders import build_encoder
from preprocessing.extract import ExtractOptions, SlideJob, extract_slide, extract_slides, main, plan_regions
from preprocessing.slide import WholeSlide, resize
from preprocessing.stores import StoreError, load_features
from preprocessing.synthetic import Scene, write_synthetic_svs
from preprocessing.tiling import load_coords, tile_slide

REPO = Path(__file__).resolve().parents[1]
TILE = 256


def _tile(slide: Path, out: Path) -> Path:
    # 0.25 µm/px slide tiled at 0.5 µm/px: 448 px reads at level 0 resized to 224, the common 40x case
    return tile_slide(slide, out, target_mpp=0.5, patch_size=224, min_tissue_fraction=0.05)


def _hits(xy: np.ndarray, bx: int, by: int, size0: int = 448) -> np.ndarray:
    """Patches (level-0 extent `size0`) overlapping the tile with top-left (bx, by)."""
    return (xy[:, 0] < bx + TILE) & (xy[:, 0] + size0 > bx) & (xy[:, 1] < by + TILE) & (xy[:, 1] + size0 > by)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    """A synthetic 40x JPEG Aperio slide, its coords file, and a copy with one corrupt JPEG tile."""
    root = tmp_path_factory.mktemp("synth")
    slide = write_synthetic_svs(root / "syn-a.svs", Scene.random(2048, 2048, "adenocarcinoma", seed=3),
                                mpp=0.25, downsamples=(4,), tile=TILE)
    coords = _tile(slide, root / "tiles")
    bad_dir = root / "bad"
    bad_dir.mkdir()
    bad = bad_dir / "syn-a.svs"  # same slide id, so the same coords file applies
    shutil.copy(slide, bad)
    xy, _ = load_coords(coords)
    # corrupt the level-0 tile that the most patches overlap (a corner shared by several 448 px patches)
    tx, ty = max(((i, j) for i in range(2048 // TILE) for j in range(2048 // TILE)),
                 key=lambda t: int(_hits(xy, t[0] * TILE, t[1] * TILE).sum()))
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[0]
        index = ty * (page.imagewidth // TILE + (page.imagewidth % TILE > 0)) + tx
        offset, nbytes = page.dataoffsets[index], page.databytecounts[index]
    with open(bad, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return {"slide": slide, "coords": coords, "bad": bad, "bad_tile": (tx * TILE, ty * TILE), "root": root}


@pytest.fixture(scope="module")
def tiny():
    return build_encoder("conch_tiny")


def naive_features(slide: Path, coords_h5: Path, enc, rows: np.ndarray) -> np.ndarray:
    """One read_region per patch, as CLAM/TRIDENT do: the reference for the region-cut data path."""
    xy, attrs = load_coords(coords_h5)
    rs, ps, level = int(attrs["read_size"]), int(attrs["patch_size"]), int(attrs["read_level"])
    with WholeSlide(slide) as ws:
        patches = np.stack([resize(ws.read_region(tuple(int(v) for v in xy[r]), level, (rs, rs)), (ps, ps)) for r in rows])
    with torch.inference_mode():
        return enc(enc.preprocess(torch.from_numpy(patches))).numpy()


def test_store_matches_coords_row_for_row(synth, tiny, tmp_path):
    out = extract_slide(synth["slide"], synth["coords"], tmp_path, num_workers=0, batch_size=5, chunk_rows=4)
    assert out == tmp_path / "syn-a.zarr" and out.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "partial store left behind"
    xy, cattrs = load_coords(synth["coords"])
    assert len(xy) >= 6
    import zarr

    g = zarr.open_group(str(out), mode="r")
    assert g["features"].shape == (len(xy), 512) and str(g["features"].dtype) == "float16"
    assert g["features"].chunks == (4, 512)
    assert str(g["coords"].dtype) == "int32"
    np.testing.assert_array_equal(g["coords"][:], xy)
    assert g["valid"][:].all()
    attrs = dict(g.attrs)
    for key in ("encoder", "checkpoint_sha256", "seed", "transform", "transform_spec", "target_mpp", "patch_size",
                "read_level", "read_size", "software", "coords_sha256", "slide_id", "n_patches", "n_valid"):
        assert key in attrs, key
    assert attrs["encoder"] == "conch_tiny" and attrs["transform"] == "slidechat" and attrs["seed"] == 0
    assert attrs["checkpoint_sha256"] is None and attrs["target_mpp"] == 0.5 and attrs["read_size"] == 448
    assert attrs["patch_size"] == 224 and attrs["n_valid"] == len(xy) and attrs["precision"] == "fp32"
    assert attrs["software"]["wsi-slidechat"] and attrs["coords_attrs"]["mpp_level0"] == cattrs["mpp_level0"]

    fs = load_features(out)
    np.testing.assert_array_equal(fs.coords, xy)
    rows = np.arange(len(xy))
    ref = naive_features(synth["slide"], synth["coords"], tiny, rows)
    # level 0: cutting patches out of a region gives exactly the per-patch pixels; fp16 storage rounding only
    np.testing.assert_allclose(fs.features, ref, atol=2e-2, rtol=2e-3)
    assert np.abs(fs.features).max() > 0.1


def test_h5_store_reads_like_clam(synth, tmp_path):
    z = extract_slide(synth["slide"], synth["coords"], tmp_path / "z", num_workers=0, chunk_rows=8)
    h = extract_slide(synth["slide"], synth["coords"], tmp_path / "h", num_workers=0, fmt="h5", chunk_rows=8)
    assert h == tmp_path / "h" / "syn-a.h5"
    assert not [p for p in (tmp_path / "h").iterdir() if p.name.startswith(".")]
    xy, cattrs = load_coords(synth["coords"])
    with h5py.File(h, "r") as f:  # what CLAM's / TRIDENT's loaders do
        feats = f["features"][:]
        coords = f["coords"][:]
        assert f["coords"].attrs["patch_size"] == 224 and f["coords"].attrs["patch_level"] == cattrs["patch_level"]
        assert f.attrs["encoder"] == "conch_tiny"
    assert feats.dtype == np.float32 and feats.shape == (len(xy), 512)
    np.testing.assert_array_equal(coords, xy)
    np.testing.assert_allclose(feats, load_features(z).features, atol=2e-2, rtol=2e-3)
    fs = load_features(h)
    assert fs.attrs["transform_spec"]["size"] == 224 and fs.slide_id == "syn-a"


def test_rerun_is_a_noop_and_other_parameters_never_mix(synth, tmp_path):
    out = extract_slide(synth["slide"], synth["coords"], tmp_path, num_workers=0)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    calls = []
    extract_slide(synth["slide"], synth["coords"], tmp_path, num_workers=0, _after_chunk=lambda s, i: calls.append(i))
    assert calls == [] and (out / "zarr.json").stat().st_mtime_ns == stamp
    with pytest.raises(StoreError, match="transform"):
        extract_slide(synth["slide"], synth["coords"], tmp_path, num_workers=0, transform="conch_official")
    with pytest.raises(StoreError, match="seed"):
        extract_slide(synth["slide"], synth["coords"], tmp_path, num_workers=0, seed=1)
    extract_slide(synth["slide"], synth["coords"], tmp_path, num_workers=0, seed=1, overwrite=True)
    assert load_features(out).attrs["seed"] == 1


class Killed(RuntimeError):
    pass


def test_killed_run_resumes_to_the_same_features(synth, tmp_path):
    kw = dict(num_workers=0, batch_size=3, chunk_rows=2, dtype="float32")
    ref = load_features(extract_slide(synth["slide"], synth["coords"], tmp_path / "ref", **kw))

    def die_after_two(slide_id: str, chunk: int) -> None:
        if chunk == 1:
            raise Killed()

    with pytest.raises(Killed):
        extract_slide(synth["slide"], synth["coords"], tmp_path / "run", _after_chunk=die_after_two, **kw)
    assert not (tmp_path / "run" / "syn-a.zarr").exists()  # no half store under the final name
    partial = tmp_path / "run" / ".syn-a.zarr.partial.zarr"
    assert sorted(p.name for p in (partial / ".progress").iterdir()) == ["0", "1"]

    # resuming with other parameters is refused instead of mixing
    with pytest.raises(StoreError, match="refusing to mix"):
        extract_slide(synth["slide"], synth["coords"], tmp_path / "run", **{**kw, "dtype": "float16"})

    resumed = []
    out = extract_slide(synth["slide"], synth["coords"], tmp_path / "run", _after_chunk=lambda s, i: resumed.append(i), **kw)
    n_chunks = -(-len(ref) // 2)
    assert sorted(resumed) == list(range(2, n_chunks))  # only the missing chunks were computed
    got = load_features(out)
    np.testing.assert_array_equal(got.coords, ref.coords)
    np.testing.assert_allclose(got.features, ref.features, atol=1e-5, rtol=1e-5)
    assert not partial.exists()


def test_sigkilled_cli_run_resumes(synth, tmp_path):
    """A real SIGKILL of `python -m preprocessing extract` (reader pool running), then a rerun."""
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "preprocessing", "extract", "--slide", str(synth["slide"]), "--coords",
           str(synth["coords"]), "--out", str(out), "--encoder", "conch_tiny", "--num-workers", "1", "--batch-size", "1",
           "--chunk-rows", "1", "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shm = Path("/dev/shm")
    shm_before = set(shm.iterdir()) if shm.is_dir() else set()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    progress = out / ".syn-a.zarr.partial.zarr" / ".progress"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_dir() and any(p.name.isdigit() for p in progress.iterdir()):
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"extraction ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the whole group died, its resource tracker too (a scheduler's kill): nobody is left to unlink its batch ring
    for leftover in (set(shm.iterdir()) - shm_before) if shm.is_dir() else ():
        if leftover.name.startswith("psm_"):
            leftover.unlink(missing_ok=True)
    assert not (out / "syn-a.zarr").exists()
    done_before = {p.name for p in progress.iterdir() if p.name.isdigit()}
    assert done_before
    assert main(["--slide", str(synth["slide"]), "--coords", str(synth["coords"]), "--out", str(out),
                 "--encoder", "conch_tiny", "--num-workers", "0", "--chunk-rows", "1", "--dtype", "float32"]) == 0
    ref = load_features(extract_slide(synth["slide"], synth["coords"], tmp_path / "ref", num_workers=0, dtype="float32"))
    got = load_features(out / "syn-a.zarr")
    np.testing.assert_allclose(got.features, ref.features, atol=1e-5, rtol=1e-5)


def test_corrupt_tile_marks_only_its_patches_invalid(synth, tiny, tmp_path):
    xy, attrs = load_coords(synth["coords"])
    hit = _hits(xy, *synth["bad_tile"])
    assert 2 <= hit.sum() < len(xy)
    clean = load_features(extract_slide(synth["slide"], synth["coords"], tmp_path / "clean", num_workers=0,
                                        dtype="float32"))
    # tiles decoded by a reader process, by the main process, on the device (torchvision here), or OpenSlide only
    for workers, decode in ((1, "reader"), (0, "reader"), (0, "device"), (0, "off")):
        out = extract_slide(synth["bad"], synth["coords"], tmp_path / f"bad{workers}{decode}", num_workers=workers,
                            dtype="float32", chunk_rows=3, tile_decode=decode)
        import zarr

        g = zarr.open_group(str(out), mode="r")
        np.testing.assert_array_equal(g["valid"][:], ~hit)
        assert np.all(g["features"][:][hit] == 0)
        a = dict(g.attrs)
        assert a["n_valid"] == int((~hit).sum())
        assert sorted(e["index"] for e in a["invalid"]) == np.flatnonzero(hit).tolist()
        assert all("JPEG" in e["error"] or "read" in e["error"] for e in a["invalid"])
        fs = load_features(out)
        np.testing.assert_array_equal(fs.coords, xy[~hit])
        # patches in the same region as the bad tile were re-read one by one and are intact
        np.testing.assert_allclose(fs.features, clean.features[~hit], atol=1e-5, rtol=1e-5)


def test_one_pool_for_several_slides(synth, tmp_path):
    second = write_synthetic_svs(tmp_path / "syn-b.svs", Scene.random(1536, 1536, "lymphoid", seed=4), mpp=0.25,
                                 downsamples=(4,), tile=TILE)
    coords_b = _tile(second, tmp_path / "tiles")
    jobs = [SlideJob(synth["slide"], synth["coords"]), SlideJob(second, coords_b)]
    outs = extract_slides(jobs, tmp_path / "pool", ExtractOptions(encoder="conch_tiny", num_workers=2, batch_size=7,
                                                                  chunk_rows=5, dtype="float32", region_px=900))
    assert [p.name for p in outs] == ["syn-a.zarr", "syn-b.zarr"]
    for job, out in zip(jobs, outs):
        single = extract_slide(job.slide, job.coords, tmp_path / "single", num_workers=0, dtype="float32")
        a, b = load_features(out), load_features(single)
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_allclose(a.features, b.features, atol=1e-4, rtol=1e-4)


def test_plan_regions_cover_each_row_once():
    xs, ys = np.meshgrid(np.arange(0, 4480, 448), np.arange(0, 2240, 448))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    rows = np.arange(len(coords))[::2]  # sparse subset, as when resuming
    groups = plan_regions(coords, rows, (1.0, 1.0), 448, 1000)
    assert sorted(np.concatenate(groups).tolist()) == rows.tolist()
    for g in groups:  # each region holds at most 2x2 patches of 448 px for a 1000 px budget
        assert np.ptp(coords[g, 0]) <= 448 and np.ptp(coords[g, 1]) <= 448
    assert [g.min() for g in groups] == sorted(g.min() for g in groups)


def test_empty_coords_give_an_empty_store(synth, tmp_path):
    from preprocessing.tiling import write_coords_h5

    _, attrs = load_coords(synth["coords"])
    empty = tmp_path / "syn-a.h5"
    write_coords_h5(empty, np.zeros((0, 2), np.int64), np.zeros(0), {**attrs, "status": "no_tissue"})
    out = extract_slide(synth["slide"], empty, tmp_path / "f", num_workers=0)
    fs = load_features(out)
    assert fs.features.shape == (0, 512) and fs.attrs["status"] == "no_tissue"


def test_end_to_end_cmu_small_region_with_cli(cmu_small, tmp_path, capsys):
    coords = tile_slide(cmu_small, tmp_path / "tiles")
    xy, _ = load_coords(coords)
    rc = main(["--slide", str(cmu_small), "--coords", str(coords), "--encoder", "conch_tiny", "--out",
               str(tmp_path / "feats"), "--num-workers", "1"])
    assert rc == 0
    store = tmp_path / "feats" / "CMU-1-Small-Region.zarr"
    assert str(store) in capsys.readouterr().out
    fs = load_features(store)
    assert fs.features.shape == (len(xy), 512) and np.isfinite(fs.features).all()
    np.testing.assert_array_equal(fs.coords, xy)
    assert fs.attrs["mpp_level0"] == pytest.approx(0.499, abs=1e-3)
    # distinct tissue patches give distinct features
    assert np.unique(np.round(fs.features, 2), axis=0).shape[0] == len(xy)
    # missing checkpoint for a real encoder: one line naming the option, exit code 2 (a user error)
    from preprocessing.__main__ import main as dispatch

    rc = dispatch(["extract", "--slide", str(cmu_small), "--coords", str(coords), "--encoder", "conch_v1",
                   "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "--encoder-checkpoint" in err and err.count("error:") == 1


def test_options_validate():
    with pytest.raises(ValueError, match="format"):
        ExtractOptions(fmt="parquet")
    assert ExtractOptions().store_dtype == "float16" and ExtractOptions(fmt="h5").store_dtype == "float32"


def test_patches_at_a_coarser_level_do_not_depend_on_region_grouping(tmp_path):
    """Read level 1 (downsample 3) with patch corners between level pixels: each patch is the nearest-pixel crop."""
    from preprocessing.readers import PatchRing, Reader, RegionTask

    slide = write_synthetic_svs(tmp_path / "ds3.svs", Scene.random(3072, 3072, "stroma", seed=5), mpp=0.25,
                                downsamples=(3, 9), tile=TILE)
    coords = tile_slide(slide, tmp_path / "t", target_mpp=0.8, patch_size=224, min_tissue_fraction=0.0)
    xy, a = load_coords(coords)
    level, rs, ds = int(a["read_level"]), int(a["read_size"]), tuple(float(v) for v in a["read_downsample_xy"])
    assert level == 1 and rs == 239 and ds == (3.0, 3.0)
    assert np.any(xy % 3), "some corners must fall between level-1 pixels for this test to mean anything"

    def read(rows: np.ndarray, region_px: int, tiles: str) -> np.ndarray:
        ring = PatchRing(1, len(xy), 224)
        reader = Reader()
        for group in plan_regions(xy, rows, ds, rs, region_px):
            places = np.stack([np.zeros_like(group), group], axis=1)
            res = reader.read(RegionTask(0, str(slide), None, level, rs, 224, ds, group, xy[group],
                                         (ring.name, ring.shape), places, tiles=tiles))
            assert res.source == ("tiles" if tiles == "decode" else "openslide") and not res.errors
        reader.close()
        out = ring.array[0, rows].copy()
        ring.close()
        return out

    rows = np.arange(len(xy))
    one_region = read(rows, 10**6, "decode")
    for tiles in ("decode", "off"):  # the slide's own tiles, and OpenSlide
        np.testing.assert_array_equal(read(rows, 1, tiles), one_region)
        np.testing.assert_array_equal(read(rows[1::2], 700, tiles), one_region[1::2])  # a resume regroups the rest
    np.testing.assert_array_equal(read(rows, 10**6, "off"), one_region)
    with WholeSlide(slide) as ws:  # the nearest-pixel crop of the level image
        level_img = ws.read_region((0, 0), 1, ws.level_dimensions[1])
    for r in rows:
        gx, gy = (int(round(v / 3.0)) for v in xy[r])
        np.testing.assert_array_equal(one_region[r], resize(level_img[gy : gy + rs, gx : gx + rs], (224, 224)))


# --------------------------------------------------------------------------------------------------
# Pixel sources: the slide's own tiles, OpenSlide, the device decoder
# --------------------------------------------------------------------------------------------------
def _read_patches(slide: Path, coords: np.ndarray, geometry: tuple[int, int, int], ds: tuple[float, float],
                  pixels: str = "nearest", tiles: str = "decode", mpp: float | None = None,
                  cached_tiles: int = 96) -> tuple[np.ndarray, set]:
    """All patches as the readers cut them (regions planned as extraction plans them), and the sources used."""
    from preprocessing.readers import PatchRing, Reader, RegionTask

    level, rs, ps = geometry
    ring = PatchRing(1, len(coords), ps)
    reader, sources = Reader(cached_tiles=cached_tiles), set()
    try:
        for group in plan_regions(coords, np.arange(len(coords)), ds, rs, 2048):
            places = np.stack([np.zeros_like(group), group], axis=1)
            res = reader.read(RegionTask(0, str(slide), mpp, level, rs, ps, ds, group, coords[group],
                                         (ring.name, ring.shape), places, pixels, tiles))
            assert not res.errors and res.fatal is None
            sources.add(res.source)
        return ring.array[0].copy(), sources
    finally:
        reader.close()
        ring.close()


def _geometry(coords_h5: Path) -> tuple[np.ndarray, tuple[int, int, int], tuple[float, float]]:
    xy, a = load_coords(coords_h5)
    return xy, (int(a["read_level"]), int(a["read_size"]), int(a["patch_size"])), tuple(float(v) for v in a["read_downsample_xy"])


def test_tile_path_gives_openslides_pixels(synth, cmu_small, tcga_jp2k_no_mpp, tmp_path):
    """Aperio JPEG (YCbCr, and RGB with JPEG tables) and RGB JPEG 2000 tiles decode to OpenSlide's pixels."""
    cases = [(synth["slide"], synth["coords"], None),
             (cmu_small, tile_slide(cmu_small, tmp_path, min_tissue_fraction=0.25, use_padding=False), None),
             (tcga_jp2k_no_mpp, tile_slide(tcga_jp2k_no_mpp, tmp_path, target_mpp=0.25, min_tissue_fraction=0.5, use_padding=False,
                                           mpp=0.25), 0.25)]  # level 0 of the JPEG 2000 slide
    for slide, coords_h5, mpp in cases:
        xy, geometry, ds = _geometry(coords_h5)
        # a tile cache smaller than a region: decoded tiles are evicted and their memory reused mid-region
        tiles, src_tiles = _read_patches(slide, xy, geometry, ds, tiles="decode", mpp=mpp, cached_tiles=3)
        ref, src_ref = _read_patches(slide, xy, geometry, ds, tiles="off", mpp=mpp)
        assert src_tiles == {"tiles"} and src_ref == {"openslide"}
        np.testing.assert_array_equal(tiles, ref)


def test_device_decode_equals_reader_decode(synth, cmu_small, tmp_path):
    """torchvision's libjpeg-turbo decode + on-device cut and area resize give the readers' pixels exactly."""
    from preprocessing.device_tiles import decode_crops
    from preprocessing.readers import Reader, RegionTask

    for slide, coords_h5 in ((synth["slide"], synth["coords"]), (cmu_small, tile_slide(cmu_small, tmp_path, use_padding=False))):
        xy, (level, rs, ps), ds = _geometry(coords_h5)
        ref, _ = _read_patches(slide, xy, (level, rs, ps), ds)
        reader = Reader()
        for group in plan_regions(xy, np.arange(len(xy)), ds, rs, 2048):
            res = reader.read(RegionTask(0, str(slide), None, level, rs, ps, ds, group, xy[group], None,
                                         np.zeros((len(group), 2), np.int64), tiles="bytes"))
            assert res.source == "tile-bytes" and res.crops is not None
            np.testing.assert_array_equal(decode_crops(res.crops, ps, torch.device("cpu")).numpy(), ref[group])
        reader.close()
    # and through extraction: same features, the patches having come as compressed tiles
    stats: dict = {}
    opts = ExtractOptions(encoder="conch_tiny", num_workers=0, tile_decode="device", dtype="float32")
    dev = load_features(extract_slides([SlideJob(synth["slide"], synth["coords"])], tmp_path / "dev", opts,
                                       stats=stats)[0])
    assert stats["sources"] == {"tile-bytes": len(dev.coords)} and stats["settings"]["tile_decode"] == "device"
    ref = load_features(extract_slide(synth["slide"], synth["coords"], tmp_path / "ref", num_workers=0, dtype="float32"))
    np.testing.assert_array_equal(dev.features, ref.features)


def test_area_resize_is_opencvs_inter_area():
    import cv2

    from preprocessing.encoders.transforms import area_resize

    rng = np.random.default_rng(0)
    for n, exact in ((448, True), (672, True), (896, True), (443, False), (478, False)):
        a = rng.integers(0, 256, (2, n, n, 3), dtype=np.uint8)
        ref = np.stack([cv2.resize(im, (224, 224), interpolation=cv2.INTER_AREA) for im in a]).astype(int)
        got = area_resize(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(), 224).permute(0, 2, 3, 1).numpy()
        diff = np.abs(got - ref)
        if exact:
            assert diff.max() == 0, n
        else:  # OpenCV sums fractional cells in float32: a value within its rounding of .5 may differ by one
            assert diff.max() <= 1 and (diff == 0).mean() > 0.9999, n


def test_readers_do_not_import_torch(synth):
    code = "import sys, preprocessing.readers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}).returncode == 0
    from preprocessing.readers import PatchRing, ReaderPool, RegionTask

    xy, (level, rs, ps), ds = _geometry(synth["coords"])
    ring = PatchRing(1, len(xy), ps)
    try:
        with ReaderPool(1) as pool:
            pool.submit(RegionTask(0, str(synth["slide"]), None, level, rs, ps, ds, np.arange(2), xy[:2],
                                   (ring.name, ring.shape), np.array([[0, 0], [0, 1]])))
            res = pool.get()
            maps = Path(f"/proc/{res.pid}/maps").read_text()
        assert res.pid != os.getpid() and not res.errors and ring.array[0, :2].any()
        assert "libtorch" not in maps and "libopenslide" in maps
    finally:
        ring.close()


# --------------------------------------------------------------------------------------------------
# Presets: pixels as CLAM and TRIDENT read them (reference data from their own code, tests/data/peer_extraction/README.md)
# --------------------------------------------------------------------------------------------------
PEER_DATA = REPO / "tests" / "data" / "peer_extraction"


@pytest.fixture(scope="module")
def resnet_trunc():
    return build_encoder("resnet50_trunc", allow_random=True, seed=0)


@pytest.mark.parametrize("tool", ["clam", "trident"])
@pytest.mark.parametrize("name", ["cmu", "tcga", "synthetic40x"])
def test_presets_read_and_resize_as_the_tools_do(name, tool, synth, resnet_trunc, request):
    import hashlib

    slide = {"cmu": lambda: request.getfixturevalue("cmu_small"),
             "tcga": lambda: request.getfixturevalue("tcga_jp2k_no_mpp"),
             "synthetic40x": lambda: synth["slide"]}[name]()
    ref = np.load(PEER_DATA / f"{name}-{tool}.npz")
    level, rs, ps = (int(v) for v in ref["geometry"])
    mpp = None if np.isnan(ref["mpp"]) else float(ref["mpp"])
    ds = tuple(float(v) for v in ref["downsample_xy"])
    coords = ref["coords"]
    patches, _ = _read_patches(slide, coords, (level, rs, ps), ds, pixels=tool, mpp=mpp)
    digests = np.stack([np.frombuffer(hashlib.sha256(p.tobytes()).digest(), np.uint8) for p in patches])
    np.testing.assert_array_equal(digests, ref["pixel_sha256"])  # every patch, bit for bit
    rows = ref["feature_rows"]
    with torch.inference_mode():
        feats = resnet_trunc(resnet_trunc.preprocess(torch.from_numpy(patches[rows]))).numpy()
    np.testing.assert_allclose(feats, ref["features"], rtol=1e-5, atol=1e-5)
    default, _ = _read_patches(slide, coords, (level, rs, ps), ds, mpp=mpp)
    # our default differs only where the tools interpolate (level 1 of the TCGA slide) or resize (40x -> 448 px)
    assert np.array_equal(default, patches) == (name == "cmu")


def test_preset_is_part_of_the_store_identity(synth, tmp_path):
    out = extract_slide(synth["slide"], synth["coords"], tmp_path, num_workers=0, preset="trident")
    attrs = load_features(out).attrs
    assert attrs["preset"] == "trident" and attrs["extraction_settings"]["tile_decode"] == "reader"
    with pytest.raises(StoreError, match="preset"):
        extract_slide(synth["slide"], synth["coords"], tmp_path, num_workers=0)
    assert main(["--slide", str(synth["slide"]), "--coords", str(synth["coords"]), "--out", str(tmp_path),
                 "--preset", "trident", "--encoder", "conch_tiny"]) == 0  # same identity: up to date


def test_precision_and_memory_format(synth, tmp_path):
    """bf16 on CPU is opt-in and recorded in the identity; channels_last and BatchNorm folding change features
    only at float precision (the reference: the encoder as built, contiguous, unfolded), and fold a copy."""
    enc = build_encoder("resnet50_trunc", allow_random=True)
    xy, (level, rs, ps), ds = _geometry(synth["coords"])
    patches, _ = _read_patches(synth["slide"], xy, (level, rs, ps), ds)
    with torch.inference_mode():
        reference = enc(enc.preprocess(torch.from_numpy(patches))).numpy()
    kw = dict(num_workers=0, dtype="float32", fmt="h5")
    a = load_features(extract_slides([SlideJob(synth["slide"], synth["coords"])], tmp_path / "cl", encoder=enc,
                                     **kw)[0])
    settings = a.attrs["extraction_settings"]
    assert settings["memory_format"] == "channels_last" and settings["folded_batchnorm"] and a.attrs["precision"] == "fp32"
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.model.modules())  # the caller's encoder is intact
    np.testing.assert_allclose(a.features, reference, rtol=1e-4, atol=1e-5)
    c = load_features(extract_slides([SlideJob(synth["slide"], synth["coords"])], tmp_path / "bf16", encoder=enc,
                                     precision="bf16", **kw)[0])
    assert c.attrs["precision"] == "bf16"
    rel = np.linalg.norm(c.features - reference) / np.linalg.norm(reference)
    assert 0 < rel < 0.05


@pytest.fixture(scope="module")
def cmu_coords(cmu_small, tmp_path_factory) -> Path:
    return tile_slide(cmu_small, tmp_path_factory.mktemp("cmu_tiles"))


def _edited_coords(src: Path, dst: Path, coords=None, attrs: dict | None = None) -> Path:
    """A copy of coords file `src` with its coords dataset replaced and/or attributes changed (None deletes)."""
    with h5py.File(src, "r") as f:
        data = f["coords"][:] if coords is None else coords(f["coords"][:])
        old = dict(f["coords"].attrs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(dst, "w") as g:
        d = g.create_dataset("coords", data=data)
        for k, v in {**old, **(attrs or {})}.items():
            if v is not None:
                d.attrs[k] = v
    return dst


HOSTILE_COORDS = {
    # a coords file that is not what tiling writes: refused naming the file, never read as something else
    "three_columns": (lambda c: np.zeros((10, 3), np.int64), {}, "(N, 2)"),
    "strings": (lambda c: np.array([b"a", b"b"]), {}, "not numbers"),
    "nan": (lambda c: np.where(np.arange(len(c))[:, None] == 0, np.nan, c.astype(float)), {}, "finite"),
    "fractional": (lambda c: c.astype(float) + 0.5, {}, "whole"),
    "patch_size_0": (None, {"patch_size": 0}, "patch_size"),
    "patch_size_text": (None, {"patch_size": "abc"}, "patch_size"),
    "read_size_0": (None, {"read_size": 0}, "read_size"),
    "read_size_negative": (None, {"read_size": -5}, "read_size"),
    "read_size_huge": (None, {"read_size": 200_000, "patch_size": 200_000}, "read_size"),
    "downsample_0": (None, {"read_downsample_xy": np.array([0.0, 0.0])}, "downsample"),
    "downsample_nan": (None, {"read_downsample_xy": np.array([np.nan, np.nan])}, "downsample"),
    # attributes that do not fit the slide they were paired with
    "level_5": (None, {"read_level": 5, "patch_level": 5}, "level 5"),
    "downsample_wrong": (None, {"read_downsample_xy": np.array([2.0, 2.0])}, "downsample"),
    "outside": (lambda c: c + np.array([100_000, 0]), {}, "outside"),
    "negative": (lambda c: c - np.array([5_000, 0]), {}, "outside"),
    "int_overflow": (lambda c: np.full((3, 2), 2**62, np.int64), {}, "outside"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_COORDS))
def test_hostile_coords_files_are_one_line_errors_before_anything_is_written(case, cmu_small, cmu_coords, tmp_path,
                                                                             capsys):
    from preprocessing.__main__ import main as dispatch

    edit, attrs, needle = HOSTILE_COORDS[case]
    bad = _edited_coords(cmu_coords, tmp_path / case / cmu_coords.name, edit, attrs)
    out = tmp_path / "feats"
    rc = dispatch(["extract", "--slide", str(cmu_small), "--coords", str(bad), "--encoder", "conch_tiny",
                   "--out", str(out), "--num-workers", "0"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert str(bad) in lines[0] and needle in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), "a store was started from a coords file that was refused"


def test_out_that_is_a_file_is_a_one_line_error(cmu_small, cmu_coords, tmp_path, capsys):
    from preprocessing.__main__ import main as dispatch

    not_a_dir = tmp_path / "features.txt"
    not_a_dir.write_text("mine\n")
    rc = dispatch(["extract", "--slide", str(cmu_small), "--coords", str(cmu_coords), "--encoder", "conch_tiny",
                   "--out", str(not_a_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "features.txt" in err and "--out" in err, err
    assert not_a_dir.read_text() == "mine\n"


def test_a_folder_given_as_coords_file_is_named_as_a_folder(cmu_small, cmu_coords, tmp_path, capsys):
    from preprocessing.__main__ import main as dispatch

    rc = dispatch(["extract", "--slide", str(cmu_small), "--coords", str(cmu_coords.parent), "--encoder", "conch_tiny",
                   "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc == 2 and "folder" in err and "--coords" in err and "not found" not in err, err


def test_reader_processes_leave_no_traceback_and_no_shared_memory(cmu_small, cmu_coords, tmp_path):
    """Readers attach to the batch ring the main process created; the resource tracker they share with it must
    not be told twice that the segment is gone (it printed a KeyError traceback after every run with readers)."""
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    res = subprocess.run([sys.executable, "-m", "preprocessing", "extract", "--slide", str(cmu_small), "--coords",
                          str(cmu_coords), "--encoder", "conch_tiny", "--out", str(tmp_path / "f"), "--num-workers", "2"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "KeyError" not in res.stderr, res.stderr
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not [n for n in after - before if n.startswith("psm_")], "a batch ring was left in /dev/shm"
    # SIGKILL of the main process alone: the tracker it shares with the readers unlinks the ring
    proc = subprocess.Popen([sys.executable, "-m", "preprocessing", "extract", "--slide", str(cmu_small), "--coords",
                             str(cmu_coords), "--encoder", "conch_tiny", "--out", str(tmp_path / "k"), "--num-workers",
                             "2", "--batch-size", "1", "--chunk-rows", "1"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress = tmp_path / "k" / ".CMU-1-Small-Region.zarr.partial.zarr" / ".progress"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (
            progress.is_dir() and any(p.name.isdigit() for p in progress.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, "extraction ended before it could be killed"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("psm_")]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"batch ring {left} left in /dev/shm after the main process was killed"


def test_an_mpp_override_that_contradicts_the_coords_is_refused_not_just_recorded(cmu_small, cmu_coords, tmp_path,
                                                                                    capsys):
    """The coords fix the geometry (tiled at the slide's 0.499 µm/px): a different --mpp at extraction cannot be
    honoured, and recording it in the store beside mpp_level0 0.499 would make the store contradict itself."""
    from preprocessing.__main__ import main as dispatch

    rc = dispatch(["extract", "--slide", str(cmu_small), "--coords", str(cmu_coords), "--encoder", "conch_tiny",
                   "--out", str(tmp_path / "f"), "--mpp", "0.25"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "--mpp" in err and str(cmu_coords) in err and "0.499" in err, err
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())
