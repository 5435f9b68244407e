"""Slide access: formats, pixel size resolution, compositing, level choice and exact downsamples."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import openslide
import pytest

import struct

import tifffile

from preprocessing.slide import (
    MissingMppError,
    SlideError,
    UnusualSlideError,
    WholeSlide,
    composite_on_background,
    mpp_from_properties,
)
from preprocessing.synthetic import Scene, write_synthetic_svs
from preprocessing.tissue import make_params, segment_slide_object


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocessing", *args], capture_output=True, text=True)


def write_tiff_claiming(path, width: int, height: int):
    """A real 512² tiled JPEG TIFF whose ImageWidth/ImageLength tags are then rewritten to claim another size
    (OpenSlide opens it as generic-tiff with the claimed dimensions)."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb", compression="jpeg",
                  metadata=None)
    with tifffile.TiffFile(path) as tf:
        offsets = {name: tf.pages[0].tags[name].valueoffset for name in ("ImageWidth", "ImageLength")}
    raw = bytearray(path.read_bytes())
    for name, value in (("ImageWidth", width), ("ImageLength", height)):
        raw[offsets[name]: offsets[name] + 4] = struct.pack("<I", value)
    path.write_bytes(raw)
    return path


@pytest.fixture(scope="module")
def pyramid_2x(tmp_path_factory):
    """40x (0.25 µm/px) Aperio pyramid with 2x, 4x, 8x levels."""
    path = tmp_path_factory.mktemp("pyr") / "pyr2x.svs"
    write_synthetic_svs(path, Scene.random(2048, 1536, "generic", seed=1), mpp=0.25, downsamples=(2, 4, 8))
    return path


@pytest.fixture(scope="module")
def pyramid_3x(tmp_path_factory):
    """40x pyramid whose levels lack a 2x downsample (3x, 9x), with sizes that do not divide evenly."""
    path = tmp_path_factory.mktemp("pyr") / "pyr3x.svs"
    write_synthetic_svs(path, Scene.random(2000, 1700, "generic", seed=2), mpp=0.25, downsamples=(3, 9))
    return path


def test_synthetic_svs_opens_as_aperio(pyramid_2x):
    osr = openslide.OpenSlide(str(pyramid_2x))
    assert osr.properties["openslide.vendor"] == "aperio"
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert osr.properties["aperio.AppMag"] == "40"
    assert osr.level_dimensions == ((2048, 1536), (1024, 768), (512, 384), (256, 192))
    assert "thumbnail" in osr.associated_images


def test_real_cmu_metadata(cmu_small):
    with WholeSlide(cmu_small) as ws:
        assert ws.slide_id == "CMU-1-Small-Region"
        assert ws.vendor == "aperio"
        assert ws.mpp_xy == pytest.approx((0.499, 0.499))
        assert ws.objective_power == 20
        assert ws.best_level_for_mpp(0.5) == 0
        assert ws.best_level_for_mpp(0.25) == 0  # finer than the scan: level 0, resampled up


def test_missing_mpp_is_a_clear_error(tcga_jp2k_no_mpp):
    with WholeSlide(tcga_jp2k_no_mpp) as ws:
        assert not ws.has_mpp
        with pytest.raises(MissingMppError) as err:
            _ = ws.mpp_x
    msg = str(err.value)
    assert "tcga-cr-7395-01a-01-ts1" in msg and "--mpp" in msg and "config" not in msg
    assert "mpp_overrides" in err.value.config_hint  # added to the message under the workflow


def test_mpp_override_on_jpeg2000(tcga_jp2k_no_mpp):
    with WholeSlide(tcga_jp2k_no_mpp, mpp_override=0.25) as ws:
        assert ws.mpp_source == "override"
        assert ws.level_downsample_xy(1) == (4443 / 2221, 3567 / 1783)
        assert ws.best_level_for_mpp(0.5) == 1  # 0.25 * 2.0005 = 0.50013 is within rounding of 0.5
        region = ws.read_region((1000, 1000), 1, (64, 64))
        assert region.shape == (64, 64, 3) and region.dtype == np.uint8
        assert region.std() > 5  # JPEG 2000 decoded to real tissue, not a flat colour


def test_mpp_resolution_order():
    assert mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26", "aperio.MPP": "9"}) == (0.25, 0.26)
    assert mpp_from_properties({"aperio.MPP": "0.499"}) == (0.499, 0.499)
    assert mpp_from_properties({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"}) == (0.25, 0.25)
    assert mpp_from_properties({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600"}) == (0.25, 0.25)
    assert mpp_from_properties({"tiff.ResolutionUnit": "inch"}) is None
    assert mpp_from_properties({"openslide.mpp-x": "0", "aperio.MPP": "nan"}) is None


def test_generic_tiff_levels_exact_downsamples(boxes_pyramid):
    with WholeSlide(boxes_pyramid) as ws:
        assert ws.vendor == "generic-tiff"
        # OpenSlide reports 4.016...; the exact per-axis ratios are 300/75 and 250/62.
        assert ws.level_downsample_xy(2) == (300 / 75, 250 / 62)
        assert ws.level_downsample_xy(3) == (300 / 37, 250 / 31)
    with WholeSlide(boxes_pyramid, mpp_override=0.25) as ws:
        assert ws.best_level_for_mpp(0.5) == 1
        # Level 2 is exactly 1.0 µm/px in x but 0.25 * 250/62 = 1.008 in y: coarser than asked, so level 1.
        assert ws.best_level_for_mpp(1.0) == 1
        assert ws.best_level_for_mpp(1.01) == 2
        assert ws.best_level_for_mpp(2.1) == 3


def test_level_choice_closest_at_least_as_fine(pyramid_2x, pyramid_3x):
    with WholeSlide(pyramid_2x) as ws:
        assert [ws.best_level_for_mpp(m) for m in (0.25, 0.5, 0.9, 1.0, 2.0, 5.0)] == [0, 1, 1, 2, 3, 3]
    with WholeSlide(pyramid_3x) as ws:
        assert ws.best_level_for_mpp(0.5) == 0  # 0.75 µm/px at level 1 would be coarser than asked
        assert ws.best_level_for_mpp(0.8) == 1
        dx, dy = ws.level_downsample_xy(1)
        assert (dx, dy) == (2000 / 666, 1700 / 566)


def test_read_region_composites_transparent_onto_background(cmu_small):
    with WholeSlide(cmu_small) as ws:
        outside = ws.read_region((-300, -300), 0, (200, 200))
        assert (outside == 255).all()  # outside the scan: white, not black
        edge = ws.read_region((-50, 0), 0, (100, 100))
        assert (edge[:, :50] == 255).all() and edge[:, 50:].mean() < 250
    with WholeSlide(cmu_small, background=(0, 0, 255)) as ws:
        assert (ws.read_region((-300, -300), 0, (10, 10)) == (0, 0, 255)).all()


def test_composite_blends_partial_alpha():
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (100, 100, 100, 255)
    rgba[0, 1] = (0, 0, 0, 128)
    out = composite_on_background(rgba, (255, 255, 255))
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [127, 127, 127]


def test_read_at_mpp_uses_coarser_level_when_exact(pyramid_2x):
    with WholeSlide(pyramid_2x) as ws:
        via_level1 = ws.read_region_at_mpp((512, 512), (128, 128), 0.5)
        via_level0 = ws.read_region_at_mpp((512, 512), (128, 128), 0.5, level=0)
        # Same scene, two levels: close in colour, not identical (JPEG and resampling).
        assert np.abs(via_level1.astype(int) - via_level0.astype(int)).mean() < 12


def test_thumbnail_pieces_do_not_change_the_result(pyramid_3x):
    with WholeSlide(pyramid_3x) as ws:
        whole = ws.thumbnail_at_mpp(8.0, piece=100_000)
        pieces = ws.thumbnail_at_mpp(8.0, piece=64)
        assert whole.shape == pieces.shape == (54, 63, 3)  # ceil(1700 * 0.25 / 8), ceil(2000 * 0.25 / 8)
        assert np.abs(whole.astype(int) - pieces.astype(int)).mean() < 3


def test_unreadable_files(tmp_path, cmu_small):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all")
    with pytest.raises(SlideError, match="junk"):
        WholeSlide(junk)
    with pytest.raises(SlideError, match="not found"):
        WholeSlide(tmp_path / "missing.svs")
    truncated = tmp_path / "truncated.svs"
    data = cmu_small.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated"):
        with WholeSlide(truncated) as ws:
            ws.thumbnail_at_mpp(2.0)


def test_cli_module_runs():
    out = subprocess.run([sys.executable, "-m", "preprocessing", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "segment" in out.stdout and "tile" in out.stdout


def test_implausible_mpp_is_refused_before_any_pixel_is_read(boxes_pyramid, tmp_path):
    """boxes-synthetic-pyramid.tiff records 352.78 µm/px: refused with one line, processed when allowed."""
    with WholeSlide(boxes_pyramid) as ws:
        with pytest.raises(UnusualSlideError) as err:
            ws.check_plausible()
        # segmentation checks before it reads the thumbnail
        with pytest.raises(UnusualSlideError):
            segment_slide_object(ws, make_params())
    msg = str(err.value)
    assert "boxes-synthetic-pyramid" in msg and "352.8 µm/px" in msg and "--allow-unusual-slide" in msg
    assert "\n" not in msg
    res = run_cli("segment", "--slide", str(boxes_pyramid), "--out", str(tmp_path / "refused"))
    assert res.returncode == 2 and "outside the plausible 0.05-20 µm/px" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists() or not list((tmp_path / "refused").iterdir())
    res = run_cli("segment", "--slide", str(boxes_pyramid), "--out", str(tmp_path / "allowed"), "--allow-unusual-slide")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "allowed" / "boxes-synthetic-pyramid_mask.png").exists()
    with WholeSlide(boxes_pyramid, mpp_override=0.25) as ws:
        ws.check_plausible()  # a plausible override makes it an ordinary slide


def test_implausible_mpp_override_is_refused(cmu_small):
    for mpp in (0.01, 25.0):
        with WholeSlide(cmu_small, mpp_override=mpp) as ws:
            with pytest.raises(UnusualSlideError, match="override"):
                ws.check_plausible()


def test_size_beyond_what_the_file_holds_is_refused(tmp_path):
    """A ~10 kB file claiming 200,000 x 200,000 px is refused at once, not segmented for minutes."""
    path = write_tiff_claiming(tmp_path / "huge.tiff", 200_000, 200_000)
    with WholeSlide(path, mpp_override=0.25) as ws:
        assert ws.dimensions == (200_000, 200_000)
        with pytest.raises(UnusualSlideError, match="px per byte"):
            ws.check_plausible()
    res = run_cli("segment", "--slide", str(path), "--out", str(tmp_path / "o"), "--mpp", "0.25")
    assert res.returncode == 2 and "200000 x 200000" in res.stderr and "--allow-unusual-slide" in res.stderr
    side = write_tiff_claiming(tmp_path / "side.tiff", 600_000, 512)
    with WholeSlide(side, mpp_override=0.25) as ws:
        with pytest.raises(UnusualSlideError, match="500,000"):
            ws.check_plausible()


def test_segmentation_image_size_is_bounded(cmu_small):
    """A thumbnail finer than the bound (here 0.05 µm/px: 22,200 x 29,670 px) is refused, not allocated."""
    with WholeSlide(cmu_small) as ws:
        with pytest.raises(UnusualSlideError, match="Mpx limit"):
            segment_slide_object(ws, make_params(seg_mpp=0.05))


def test_reading_a_large_slide_says_how_far_it_is(cmu_small, capsys):
    """Segmentation reads a huge slide piecewise for minutes: progress lines name the slide, level and pieces
    (plain lines when no terminal is attached), and the picture is that of the one-piece read."""
    with WholeSlide(cmu_small) as ws:
        whole = ws.thumbnail_at_mpp(2.0)
        assert capsys.readouterr().err == ""  # one piece: nothing to report
        pieces = ws.thumbnail_at_mpp(2.0, piece=256)
    err = capsys.readouterr().err
    assert f"slide {ws.slide_id}: reading level 0 for 2 µm/px: piece " in err and "done in" in err, err
    assert "\r" not in err
    # the same picture: each piece is resized on its own (rounding moves pixels by a grey level), none misplaced
    assert pieces.shape == whole.shape and np.abs(pieces.astype(int) - whole.astype(int)).mean() < 1.5
