"""Tissue segmentation and tiling on real and synthetic slides, through the Python API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image

from preprocessing.slide import SlideError, WholeSlide
from preprocessing.synthetic import Scene, write_blank_svs, write_synthetic_svs
from preprocessing.tiling import TilingParams, grid_coords, load_coords, PatchGeometry, tile_slide
from preprocessing.tissue import TissueMask, make_params, segment_array, segment_slide, segment_slide_object

REFERENCE = Path(__file__).parent / "data" / "reference_coords"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocessing", *args], capture_output=True, text=True)


def saturation_fraction(rgb: np.ndarray, thresh: int = 25) -> float:
    return float((cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1] > thresh).mean())


@pytest.fixture(scope="module")
def cmu_tiles(cmu_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmu")
    h5 = tile_slide(cmu_small, out)
    return out, h5


def test_cmu_tissue_found_and_kept_patches_on_tissue(cmu_small, cmu_tiles):
    out, h5 = cmu_tiles
    summary = json.loads((out / "CMU-1-Small-Region_segmentation.json").read_text())
    assert summary["status"] == "ok"
    # The section covers a sizeable part of the 1.1 x 1.5 mm crop, not all of it.
    assert 0.2 < summary["tissue_area_mm2"] < 1.2
    coords, attrs = load_coords(h5)
    assert len(coords) >= 20
    with WholeSlide(cmu_small) as ws:
        for x, y in coords:
            patch = ws.read_region((int(x), int(y)), 0, (224, 224))
            assert saturation_fraction(patch) > 0.05, f"kept patch at {(x, y)} has no tissue"
        # Grid positions that were not kept and have no tissue on the mask are background when read.
        geom = PatchGeometry.for_slide(ws, TilingParams())
        grid = grid_coords(ws.dimensions, geom, pad_edges=True)
        kept = {tuple(c) for c in coords.tolist()}
        assert kept <= {tuple(c) for c in grid.tolist()}
        rejected = [c for c in grid.tolist() if tuple(c) not in kept]
        assert len(rejected) > 20
        mask = TissueMask.load_png(out / "CMU-1-Small-Region_mask.png")
        sx, sy = mask.scale_xy
        empty = [c for c in rejected if not mask.mask[int(c[1] / sy): int((c[1] + 224) / sy) + 1,
                                                       int(c[0] / sx): int((c[0] + 224) / sx) + 1].any()]
        assert len(empty) > 10
        for x, y in empty:
            assert saturation_fraction(ws.read_region((x, y), 0, (224, 224))) < 0.3


def test_cmu_coords_file_attrs(cmu_tiles):
    _, h5 = cmu_tiles
    coords, attrs = load_coords(h5)
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    # Row-major: sorted by y, then x.
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    assert (order == np.arange(len(coords))).all()
    assert attrs["patch_size"] == 224 and attrs["target_mpp"] == 0.5
    assert attrs["mpp_level0"] == pytest.approx(0.499)
    assert attrs["patch_level"] == attrs["read_level"] == 0
    assert attrs["read_size"] == 224  # 224 * 0.5 / 0.499 = 224.4 px at level 0
    assert attrs["patch_size_level0"] == 224
    assert attrs["level0_magnification"] == 20
    assert attrs["target_magnification"] == pytest.approx(20 * 0.499 / 0.5)
    assert list(attrs["downsample"]) == [1.0, 1.0]
    assert attrs["status"] == "ok" and attrs["slide_id"] == "CMU-1-Small-Region"
    # Global grid anchored at (0, 0) with a level-0 step of 224 * 0.5 / 0.499.
    step = 224 * 0.5 / 0.499
    assert np.allclose(coords / step, np.round(coords / step), atol=0.5 / step)


def test_clam_reads_our_coords_file(cmu_tiles):
    """CLAM's Whole_Slide_Bag_FP reads coords[idx] plus attrs patch_level and patch_size."""
    _, h5 = cmu_tiles
    with h5py.File(h5, "r") as f:
        dset = f["coords"]
        assert dset.attrs["patch_level"] == 0 and dset.attrs["patch_size"] == 224
        assert dset[0].shape == (2,)
        # TRIDENT reads these:
        for key in ("patch_size_level0", "level0_magnification", "target_magnification"):
            assert key in dset.attrs


def test_cmu_geojson_and_images(cmu_tiles):
    out, _ = cmu_tiles
    gj = json.loads((out / "CMU-1-Small-Region.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    def shoelace_mm2(ring: np.ndarray) -> float:
        x, y = ring[:, 0], ring[:, 1]
        return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) * 0.499**2 / 1e6

    area_mm2 = 0.0
    for feature in gj["features"]:
        rings = [np.asarray(r) for r in feature["geometry"]["coordinates"]]
        for ring in rings:
            assert (ring[0] == ring[-1]).all()
            assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 2220 and ring[:, 1].max() <= 2967
        area_mm2 += shoelace_mm2(rings[0]) - sum(shoelace_mm2(r) for r in rings[1:])
    # Polygon areas (net of holes) match the recorded tissue area within the mask's resolution (the polygons
    # run through boundary pixel centres, half an 8 µm pixel inside the mask's edge).
    summary = json.loads((out / "CMU-1-Small-Region_segmentation.json").read_text())
    assert area_mm2 == pytest.approx(summary["tissue_area_mm2"], rel=0.15)
    mask = Image.open(out / "CMU-1-Small-Region_mask.png")
    assert float(mask.text["mpp_x"]) == pytest.approx(8.0, rel=0.01)
    assert Image.open(out / "CMU-1-Small-Region_thumbnail.png").size[1] >= 512
    assert (out / "CMU-1-Small-Region_patches.jpg").exists()


def test_clam_preset_is_clams_tcga_csv(cmu_small, tmp_path):
    params = make_params("clam")
    assert make_params("clam_tcga") == params  # the earlier name is an alias
    assert (params.sthresh, params.median_kernel, params.close_kernel, params.max_n_holes) == (8, 7, 4, 8)
    assert (params.min_tissue_area_um2, params.min_hole_area_um2, params.area_unit) == (16, 4, "clam_ref_patch")
    assert (params.seg_level, params.geometry) == (-1, "clam")
    with WholeSlide(cmu_small) as ws:
        result = segment_slide_object(ws, params)
        # One level: CLAM segments level 0 itself (0.499 µm/px), not a thumbnail.
        assert result.tissue.mask.shape == (2967, 2220)
        # a_t = 16 reference patches of 512² level-0 px = 16 * (512 * 0.499)² µm² ≈ 1.04 mm²: CLAM's
        # threshold drops this 0.65 mm² section, as CLAM itself does.
        assert not result.tissue.mask.any()
        relaxed = segment_slide_object(ws, make_params("clam", min_tissue_area_um2=1))
        assert relaxed.tissue.mask.any()
    assert segment_slide(cmu_small, tmp_path, preset="clam").exists()


def test_tcga_needs_override_cli(tcga_jp2k_no_mpp, tmp_path):
    res = run_cli("tile", "--slide", str(tcga_jp2k_no_mpp), "--out", str(tmp_path))
    assert res.returncode == 2  # a user error (wsicore.errors)
    assert "--mpp" in res.stderr and "tcga-cr-7395-01a-01-ts1" in res.stderr and "config" not in res.stderr
    assert not list(tmp_path.glob("*.h5"))
    res = run_cli("tile", "--slide", str(tcga_jp2k_no_mpp), "--out", str(tmp_path), "--mpp", "0.25")
    assert res.returncode == 0, res.stderr
    coords, attrs = load_coords(tmp_path / "tcga-cr-7395-01a-01-ts1.h5")
    assert len(coords) > 20
    assert attrs["read_level"] == 1 and attrs["read_size"] == 224 and attrs["patch_size_level0"] == 448


@pytest.mark.parametrize(
    "downsamples,read_level,read_size",
    [((2, 4, 8), 1, 224), ((4, 16), 0, 448), ((3, 9), 0, 448)],
)
def test_synthetic_40x_levels(tmp_path, downsamples, read_level, read_size):
    path = tmp_path / "s40x.svs"
    write_synthetic_svs(path, Scene.random(3000, 2600, "generic", seed=4), mpp=0.25, downsamples=downsamples)
    h5 = tile_slide(path, tmp_path / "out", target_mpp=0.5, patch_size=224)
    coords, attrs = load_coords(h5)
    assert attrs["read_level"] == read_level and attrs["read_size"] == read_size
    assert attrs["patch_size_level0"] == 448
    assert len(coords) > 5
    # Exact grid: every coordinate is a multiple of 448 level-0 px, whatever the pyramid.
    assert (coords % 448 == 0).all()
    assert (coords[:, 0] < 3000).all() and (coords[:, 1] < 2600).all()  # edge patches may run past the edge
    with WholeSlide(path) as ws:
        x, y = coords[len(coords) // 2]
        patch = ws.read_region_at_mpp((int(x), int(y)), (224, 224), 0.5)
        ref = cv2.resize(ws.read_region((int(x), int(y)), 0, (448, 448)), (224, 224), interpolation=cv2.INTER_AREA)
        assert np.abs(patch.astype(int) - ref.astype(int)).mean() < 12


def test_non_square_step_and_stride(tmp_path):
    path = tmp_path / "s.svs"
    write_synthetic_svs(path, Scene.random(2048, 2048, "generic", seed=5), mpp=0.25, downsamples=(4,))
    h5 = tile_slide(path, tmp_path / "o", target_mpp=1.0, patch_size=64, stride=32, min_tissue_fraction=0.0)
    coords, attrs = load_coords(h5)
    assert attrs["overlap"] == 32 and attrs["read_level"] == 1 and attrs["read_size"] == 64
    xs = np.unique(coords[:, 0])
    assert (np.diff(xs) % 128 == 0).all()


def test_boxes_generic_tiff(boxes_pyramid, tmp_path):
    res = run_cli("tile", "--slide", str(boxes_pyramid), "--out", str(tmp_path / "bogus"))
    assert res.returncode == 2 and "352.8 µm/px" in res.stderr  # its recorded mpp: refused before reading
    h5 = tile_slide(boxes_pyramid, tmp_path, target_mpp=0.5, patch_size=32, mpp=0.25, min_tissue_fraction=0.25,
                    seg_mpp=1.0, min_tissue_area_um2=100, median_kernel=3, use_padding=False)
    coords, attrs = load_coords(h5)
    assert attrs["read_level"] == 1 and attrs["read_size"] == 32
    assert attrs["status"] == "ok" and len(coords) > 0
    assert (coords % 64 == 0).all()


def test_blank_slide_gives_empty_coords(tmp_path):
    path = write_blank_svs(tmp_path / "blank.svs", 2048, 2048)
    res = run_cli("tile", "--slide", str(path), "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "no_tissue"
    coords, attrs = load_coords(tmp_path / "o" / "blank.h5")
    assert coords.shape == (0, 2) and attrs["status"] == "no_tissue"
    seg = json.loads((tmp_path / "o" / "blank_segmentation.json").read_text())
    assert seg["status"] == "no_tissue" and seg["tissue_area_mm2"] == 0


def test_truncated_svs_fails_clearly_and_writes_nothing(cmu_small, tmp_path):
    bad = tmp_path / "broken.svs"
    data = cmu_small.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    out = tmp_path / "o"
    res = run_cli("segment", "--slide", str(bad), "--out", str(out))
    assert res.returncode == 2
    assert res.stderr.startswith("python -m preprocessing segment: error: slide broken")
    leftovers = list(out.glob("*")) if out.exists() else []
    assert not [p for p in leftovers if p.name.startswith("broken")], leftovers
    assert not [p for p in leftovers if ".tmp-" in p.name]


def test_segmentation_reuse_by_tile(cmu_small, tmp_path):
    seg_dir, tile_dir = tmp_path / "seg", tmp_path / "tiles"
    assert run_cli("segment", "--slide", str(cmu_small), "--out", str(seg_dir)).returncode == 0
    res = run_cli("tile", "--slide", str(cmu_small), "--out", str(tile_dir), "--seg-dir", str(seg_dir))
    assert res.returncode == 0, res.stderr
    assert not (tile_dir / "CMU-1-Small-Region_mask.png").exists()  # reused, not recomputed
    direct = tile_slide(cmu_small, tmp_path / "direct")
    assert np.array_equal(load_coords(tile_dir / "CMU-1-Small-Region.h5")[0], load_coords(direct)[0])


def test_invalid_parameters():
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        TilingParams(min_tissue_fraction=1.5)
    with pytest.raises(ValueError, match="rule"):
        TilingParams(rule="random")
    with pytest.raises(ValueError, match="median_kernel"):
        make_params(median_kernel=4)
    with pytest.raises(ValueError, match="geometry"):
        make_params(geometry="shifted")
    with pytest.raises(ValueError, match="unknown preset"):
        make_params("clam_nope")


@pytest.mark.parametrize("close_kernel", [4, 5])
def test_known_square_stays_in_place(close_kernel):
    """A square on mask pixels 10-19 comes out on 10-19, whatever the closing kernel; CLAM's geometry
    (OpenCV's default anchor for an even kernel) moves it to 11-20."""
    thumb = np.full((40, 40, 3), 243, np.uint8)
    thumb[10:20, 10:20] = (200, 120, 190)
    params = dict(median_kernel=3, close_kernel=close_kernel, min_tissue_area_um2=0)
    result = segment_array(thumb, (8.0, 8.0), (640, 640), make_params(**params), (0.5, 0.5))
    ys, xs = np.nonzero(result.tissue.mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 19, 10, 19)
    if close_kernel % 2 == 0:
        shifted = segment_array(thumb, (8.0, 8.0), (640, 640), make_params(geometry="clam", **params), (0.5, 0.5))
        ys, xs = np.nonzero(shifted.tissue.mask)
        assert (ys.min(), xs.min()) == (11, 11)
    # The GeoJSON puts the contour on pixel centres: pixel 10 covers level-0 [160, 176), centre 168.
    from preprocessing.tissue import contours_to_geojson
    ring = np.asarray(contours_to_geojson(result)["features"][0]["geometry"]["coordinates"][0])
    assert ring.min(axis=0).tolist() == [168.0, 168.0] and ring.max(axis=0).tolist() == [312.0, 312.0]


@pytest.mark.parametrize("slide_fixture,mpp", [("cmu_small", None), ("tcga_jp2k_no_mpp", 0.25)])
def test_mask_and_direct_threshold_agree_best_at_zero_shift(request, slide_fixture, mpp):
    """IoU between the segmentation mask and a plain saturation threshold of the same thumbnail, over shifts
    of up to 2 mask pixels: best at (0, 0). (The old off-centre closing peaked at (-1, -1).)"""
    with WholeSlide(request.getfixturevalue(slide_fixture), mpp_override=mpp) as ws:
        result = segment_slide_object(ws, make_params())
    direct = cv2.cvtColor(result.thumbnail, cv2.COLOR_RGB2HSV)[:, :, 1] > 15
    mask = result.tissue.mask.astype(bool)
    iou = {}
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            moved = np.roll(mask, (dy, dx), axis=(0, 1))
            iou[(dx, dy)] = (moved & direct).sum() / (moved | direct).sum()
    assert max(iou, key=iou.get) == (0, 0), iou


def _reference(name: str) -> np.ndarray:
    rows = (REFERENCE / name).read_text().split()[1:]  # after the x,y header
    return np.asarray([[int(v) for v in row.split(",")] for row in rows], np.int64).reshape(-1, 2)


@pytest.mark.parametrize(
    "reference,slide_fixture,mpp,preset,overrides",
    [
        ("clam_tcga_CMU-1-Small-Region.csv", "cmu_small", None, "clam", {}),
        ("clam_tcga_at1_CMU-1-Small-Region.csv", "cmu_small", None, "clam", {"min_tissue_area_um2": 1}),
        ("clam_tcga_tcga-cr-7395-01a-01-ts1.csv", "tcga_jp2k_no_mpp", 0.25, "clam", {}),
        ("clam_tcga_at1_tcga-cr-7395-01a-01-ts1.csv", "tcga_jp2k_no_mpp", 0.25, "clam", {"min_tissue_area_um2": 1}),
        ("trident_CMU-1-Small-Region.csv", "cmu_small", None, "trident", {}),
        ("trident_tcga-cr-7395-01a-01-ts1.csv", "tcga_jp2k_no_mpp", 0.25, "trident", {}),
    ],
)
def test_preset_reproduces_the_tools_own_coordinates(request, tmp_path, reference, slide_fixture, mpp, preset,
                                                     overrides):
    """Same parameters, same patches: coordinates written by CLAM's create_patches_fp.py and TRIDENT's
    WSIPatcher (tests/data/reference_coords/README.md says how)."""
    expected = _reference(reference)
    coords, attrs = load_coords(tile_slide(request.getfixturevalue(slide_fixture), tmp_path, preset=preset, mpp=mpp,
                                           **overrides))
    assert len(coords) == len(expected)
    # the issue asks for >= 99% of the coordinates; we match them all, in the tool's order (the README says so)
    np.testing.assert_array_equal(coords, expected)
    assert attrs["tiling_rule"] == preset
    if len(coords):
        assert attrs["patch_size_level0"] == (224 if mpp is None else 448)


def test_tile_follows_the_preset_the_segmentation_recorded(cmu_small, tmp_path):
    seg_dir = tmp_path / "seg"
    assert run_cli("segment", "--slide", str(cmu_small), "--out", str(seg_dir), "--preset", "trident").returncode == 0
    res = run_cli("tile", "--slide", str(cmu_small), "--out", str(tmp_path / "t"), "--seg-dir", str(seg_dir))
    assert res.returncode == 0, res.stderr
    coords, attrs = load_coords(tmp_path / "t" / "CMU-1-Small-Region.h5")
    assert attrs["tiling_rule"] == "trident" and len(coords) == len(_reference("trident_CMU-1-Small-Region.csv"))


def test_default_keeps_tissue_at_the_slide_edge(tcga_jp2k_no_mpp, tmp_path):
    """The TCGA section reaches the right edge, 0.9 patch past the last full column: the default grid runs
    past the edge (that part reads as background) instead of dropping the strip."""
    coords, attrs = load_coords(tile_slide(tcga_jp2k_no_mpp, tmp_path, mpp=0.25))
    assert (coords[:, 0] + 448 > 4443).any()
    padded_off, _ = load_coords(tile_slide(tcga_jp2k_no_mpp, tmp_path / "inside", mpp=0.25, use_padding=False))
    assert (padded_off[:, 0] + 448 <= 4443).all() and len(padded_off) < len(coords)


def test_tile_refuses_a_preset_the_segmentation_was_not_made_with(cmu_small, tmp_path):
    """`tile --seg-dir SEG --preset clam` on a default segmentation mixed our contours with CLAM's tiling (62 patches
    on CMU, where CLAM itself keeps 0): refused, naming both presets. Presets with the same segmentation (the
    `clam_tcga` alias) and a folder without a recorded segmentation (TRIDENT's own GeoJSON) are accepted."""
    seg_dir = tmp_path / "seg"
    segment_slide(cmu_small, seg_dir)
    with pytest.raises(SlideError, match=r"made with preset 'default', not 'clam'"):
        tile_slide(cmu_small, tmp_path / "t", preset="clam", seg_dir=seg_dir)
    res = run_cli("tile", "--slide", str(cmu_small), "--out", str(tmp_path / "t"), "--seg-dir", str(seg_dir),
                  "--preset", "trident")
    assert res.returncode != 0 and "made with preset 'default', not 'trident'" in res.stderr, res.stderr
    assert not (tmp_path / "t" / "CMU-1-Small-Region.h5").exists()
    assert len(load_coords(tile_slide(cmu_small, tmp_path / "d", preset="default", seg_dir=seg_dir))[0]) == 69
    clam_dir = tmp_path / "clam"
    segment_slide(cmu_small, clam_dir, preset="clam", min_tissue_area_um2=1)  # tcga.csv with a_t = 1
    coords, attrs = load_coords(tile_slide(cmu_small, tmp_path / "c", preset="clam_tcga", seg_dir=clam_dir))
    assert attrs["tiling_rule"] == "clam" and len(coords) == 62
    (clam_dir / "CMU-1-Small-Region_segmentation.json").unlink()  # mask and contours from elsewhere
    assert load_coords(tile_slide(cmu_small, tmp_path / "e", preset="clam", seg_dir=clam_dir))[1]["tiling_rule"] == "clam"
