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


# One tiny random Qwen2 LLM for every test that needs an LLM: the tokenizer learns these texts.
TINY_LLM_CORPUS = [
    "What is the diagnosis of this slide?", "What is the most likely diagnosis?", "What tissue is shown in this slide?",
    "Which tissue type dominates the slide?", "Describe the tissue in detail.", "Describe the slide in detail please.",
    "Which grade is the tumour? A) low B) high C) none D) both", "A. adenocarcinoma B. lymphoid C. stroma D. necrosis",
    "The slide shows adenocarcinoma with irregular glands and necrosis.", "Glands with crowded nuclei.",
    "Lymphoid tissue with dense sheets of small lymphocytes.", "Sheets of small lymphocytes.", "Is there necrosis?",
    "Fibrous stroma with scattered spindle cells.", "Wavy pink collagen fibres.", "Fat cells with empty vacuoles.",
    "Answer with the option's letter from the given choices directly.",
] * 3
TINY_LLM_SETTINGS = {"vocab_size": 400, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "seed": 0}


@pytest.fixture(scope="session")
def tiny_llm_spec() -> tuple[list[str], dict]:
    """(corpus, build_tiny_llm settings) of the `tiny_llm` fixture, for tests that rebuild it."""
    return list(TINY_LLM_CORPUS), dict(TINY_LLM_SETTINGS)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory, tiny_llm_spec: tuple[list[str], dict]) -> Path:
    """A tiny random Qwen2 causal LM + BPE tokenizer (hidden 32, 2 layers), built offline once per session."""
    from slidechat.tiny import build_tiny_llm

    corpus, settings = tiny_llm_spec
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm") / "llm", corpus, **settings)


@pytest.fixture(scope="session")
def tiny_llm_one_layer(tmp_path_factory: pytest.TempPathFactory, tiny_llm_spec: tuple[list[str], dict]) -> Path:
    """`tiny_llm` with one layer and two heads, for tests that push ~8k-token prompts through generation and
    attribution (the serve tests: about 6x faster there than the two-layer model)."""
    from slidechat.tiny import build_tiny_llm

    corpus, settings = tiny_llm_spec
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm_one_layer") / "llm", corpus,
                          **{**settings, "num_layers": 1, "num_heads": 2})
