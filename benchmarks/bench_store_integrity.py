"""What checking a feature store on load costs: `load_features` (row counts, per-block CRC-32, NaN/inf) against
reading the same arrays unchecked, as loading did before stores carried checksums.

    python benchmarks/bench_store_integrity.py [--patches 38000] [--dim 512] [--rounds 15]

Rounds alternate between the two readers on the same store (float16 Zarr, 2048-row chunks, as extraction
writes it, and the float32 H5 layout); the ratio of medians is printed. Absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from preprocessing.stores import load_features, write_h5_store, write_zarr_store


def unchecked_zarr(path: Path) -> np.ndarray:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    feats = np.asarray(g["features"][:], dtype=np.float32)
    coords = np.asarray(g["coords"][:], dtype=np.int64)
    valid = np.asarray(g["valid"][:], dtype=bool)
    return feats[valid], coords[valid]


def unchecked_h5(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.asarray(f["features"][:], np.float32), np.asarray(f["coords"][:], np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=38000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((a.patches, a.dim)).astype(np.float32)
    coords = rng.integers(0, 100_000, (a.patches, 2))
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"zarr float16": (write_zarr_store(Path(tmp) / "s.zarr", feats, coords, None, {}), unchecked_zarr),
                  "h5 float32": (write_h5_store(Path(tmp) / "s.h5", feats, coords, None, {}), unchecked_h5)}
        print(f"{a.patches} x {a.dim} store, {a.rounds} alternating rounds (median seconds)")
        for name, (path, unchecked) in stores.items():
            times: dict[str, list[float]] = {"unchecked": [], "checked": []}
            for _ in range(a.rounds):
                for label, read in (("unchecked", unchecked), ("checked", load_features)):
                    t0 = time.perf_counter()
                    read(path)
                    times[label].append(time.perf_counter() - t0)
            ratios = np.array(times["checked"]) / np.array(times["unchecked"])
            print(f"{name:>12}: unchecked {np.median(times['unchecked']):.3f} s, checked {np.median(times['checked']):.3f} s, "
                  f"checked/unchecked {np.median(ratios):.2f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
