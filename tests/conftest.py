"""Shared test fixtures: paths to the real data in ../shared (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_SHARED_DIR", REPO.parent / "shared"))
SLIDES = SHARED / "slides"
VLM_DATA = SHARED / "wsi-vlm-data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found: {path} (set WSI_SHARED_DIR or place ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def cmu_small() -> Path:
    """Real H&E Aperio SVS, 2220x2967, mpp 0.499, one level."""
    return _require(SLIDES / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def tcga_jp2k_no_mpp() -> Path:
    """Real TCGA Aperio SVS, JPEG 2000, two levels, no mpp in metadata."""
    return _require(SLIDES / "tcga-cr-7395-01a-01-ts1.svs")


@pytest.fixture(scope="session")
def cmu_crop_16() -> Path:
    return _require(SLIDES / "CMU-1-crop-16x16-small.svs")


@pytest.fixture(scope="session")
def boxes_pyramid() -> Path:
    """Synthetic generic tiled TIFF, 4 levels with non-power-of-two downsamples."""
    return _require(SLIDES / "boxes-synthetic-pyramid.tiff")


@pytest.fixture(scope="session")
def vlm_data() -> Path:
    return _require(VLM_DATA)
