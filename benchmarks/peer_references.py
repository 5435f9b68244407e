"""Reference pixels and features from CLAM's and TRIDENT's own code, for tests/test_extract.py (presets).

    python benchmarks/peer_references.py --clam /tmp/CLAM --trident /tmp/TRIDENT --out tests/data/peer_extraction

For three slides (the real CMU-1-Small-Region at level 0, the real TCGA slide at level 1 with downsample
2.0005 and mpp 0.25 given, and a synthetic 40x slide read at 448 px and resized to 224) it tiles with our
tiling, runs each tool's feature step on those coords through `peer_extract.py` (random ResNet-50 trunk,
seed 0, the weights our `resnet50_trunc` builds) and keeps, per slide and tool, in `<slide>-<tool>.npz`:
the coords and read geometry, the sha256 of every patch's pixels as the tool hands them to `ToTensor`,
and the features of 4 patches. Nothing of the tools' code is kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocessing.encoders import build_encoder  # noqa: E402
from preprocessing.synthetic import Scene, write_synthetic_svs  # noqa: E402
from preprocessing.tiling import load_coords, tile_slide  # noqa: E402

SHARED = REPO.parent / "shared" / "slides"
KEEP_FEATURES = 4


def synthetic_40x(path: Path) -> Path:
    """The 40x slide of tests/test_extract.py's `synth` fixture (same call, same bytes)."""
    return write_synthetic_svs(path, Scene.random(2048, 2048, "adenocarcinoma", seed=3), mpp=0.25, downsamples=(4,),
                               tile=256)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clam", type=Path, required=True, help="CLAM checkout")
    ap.add_argument("--trident", type=Path, required=True, help="TRIDENT checkout")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "peer_extraction")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "resnet50_trunc_seed0.pt"
        torch.save(build_encoder("resnet50_trunc", allow_random=True, seed=0).model.net.state_dict(), weights)
        slides = {
            "cmu": (SHARED / "CMU-1-Small-Region.svs", None, 0.25),
            "tcga": (SHARED / "tcga-cr-7395-01a-01-ts1.svs", 0.25, 0.25),
            "synthetic40x": (synthetic_40x(tmp / "syn-a.svs"), None, 0.05),
        }
        for name, (slide, mpp, min_tissue) in slides.items():
            coords_file = tile_slide(slide, tmp / "tiles", target_mpp=0.5, patch_size=224,
                                     min_tissue_fraction=min_tissue, mpp=mpp)
            coords, attrs = load_coords(coords_file)
            keep = np.unique(np.linspace(0, len(coords) - 1, KEEP_FEATURES).round().astype(int))
            for tool, repo in (("clam", args.clam), ("trident", args.trident)):
                raw = tmp / f"{name}-{tool}.npz"
                cmd = [sys.executable, str(REPO / "benchmarks" / "peer_extract.py"), tool, "--repo", str(repo),
                       "--slide", str(slide), "--coords", str(coords_file), "--weights", str(weights),
                       "--out", str(raw), "--record-pixels"] + (["--mpp", str(mpp)] if mpp else [])
                info = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                got = np.load(raw)
                assert np.array_equal(got["coords"], coords) and len(got["pixel_sha256"]) == len(coords)
                np.savez_compressed(
                    args.out / f"{name}-{tool}.npz", coords=coords, pixel_sha256=got["pixel_sha256"],
                    feature_rows=keep, features=got["features"][keep],
                    geometry=np.array([attrs["read_level"], attrs["read_size"], attrs["patch_size"]]),
                    downsample_xy=np.asarray(attrs["read_downsample_xy"], np.float64), mpp=np.float64(mpp or np.nan),
                    tool_commit=np.str_(info["commit"]))
                print(f"{name}-{tool}: {len(coords)} patches, commit {info['commit'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
