"""Per-slide feature stores: Zarr v3 (default), CLAM/TRIDENT H5, and SlideChat CSV import/export.

Zarr store `<slide_id>.zarr` (a directory):
    features (N, D)  float16 by default, chunks of `chunk_rows` rows x all D (one chunk = a contiguous block)
    coords   (N, 2)  int32 level-0 top-left (x, y), in the tiling order of the coords file
    valid    (N,)    bool; False where the patch could not be read (corrupt tile), its features are zero
    attrs: encoder, checkpoint_sha256, seed, transform (+ spec), target_mpp, patch_size, read_level, ...
    All N rows of the coords file are present, row for row; readers use `load_features` (valid rows only).

H5 store `<slide_id>.h5` (CLAM/TRIDENT layout): `features` (N_valid, D) float32 and `coords` (N_valid, 2)
int64 with the coords file's attributes on `coords`; invalid patches are left out (CLAM readers have no
mask) and listed in the root attribute `invalid_indices`. Our own attributes are the root attributes.

SlideChat CSV `<slide_id>.csv`: header `0,1,...,D-1,patch_name`, one row per valid patch, no index column,
`patch_name` = `{x}_{y}.jpeg`; this is what SlideChat's loader reads (`pd.read_csv(f).iloc[:, :512]`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from preprocessing import __version__
from wsicore.files import atomic_path, jsonable
from wsicore.errors import InputError

STORE_FORMAT = "wsi-slidechat-features"
STORE_FORMAT_VERSION = 1
_PATCH_NAME = re.compile(r"(-?\d+)_(-?\d+)(?:\.[A-Za-z0-9]+)?$")


class StoreError(InputError, RuntimeError):
    """A feature store that cannot be read, or one that would be mixed with different parameters."""


@dataclass
class FeatureSet:
    """The valid patches of one slide: features (N, D) float32 and level-0 coords (N, 2) int64."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict = field(default_factory=dict)
    slide_id: str = ""

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def store_kind(path: str | Path) -> str:
    """"zarr", "h5" or "csv", from the path (a Zarr store is a directory with zarr.json)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".zarr") or (p.is_dir() and (p / "zarr.json").exists()):
        return "zarr"
    if name.endswith((".h5", ".hdf5")):
        return "h5"
    if name.endswith(".csv"):
        return "csv"
    raise StoreError(f"{p}: unknown feature store type (expected <slide_id>.zarr, .h5 or .csv)")


def slide_id_of_store(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".zarr", ".hdf5", ".h5", ".csv"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def load_features(path: str | Path) -> FeatureSet:
    """Features of one slide from a Zarr store, a CLAM/TRIDENT H5 file, or a SlideChat CSV (valid rows only)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"feature store not found: {p}")
    kind = store_kind(p)
    if kind == "zarr":
        return _load_zarr(p)
    if kind == "h5":
        return _load_h5(p)
    return _load_csv(p)


def read_store_attrs(path: str | Path) -> dict:
    """Attributes of a store without reading its arrays."""
    p = Path(path)
    kind = store_kind(p)
    if kind == "zarr":
        import zarr

        return dict(zarr.open_group(str(p), mode="r").attrs)
    if kind == "h5":
        with h5py.File(p, "r") as f:
            return _h5_root_attrs(f)
    return {}


def _load_zarr(p: Path) -> FeatureSet:
    import zarr

    try:
        g = zarr.open_group(str(p), mode="r")
        feats = np.asarray(g["features"][:], dtype=np.float32)
        coords = np.asarray(g["coords"][:], dtype=np.int64).reshape(-1, 2)
        valid = np.asarray(g["valid"][:], dtype=bool) if "valid" in g else np.ones(len(coords), bool)
        attrs = dict(g.attrs)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise StoreError(f"{p}: not a readable feature store ({type(exc).__name__}: {exc})") from exc
    return FeatureSet(feats[valid], coords[valid], attrs, str(attrs.get("slide_id") or slide_id_of_store(p)))


def _h5_root_attrs(f: h5py.File) -> dict:
    attrs: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and k.endswith("_json"):
            attrs[k[: -len("_json")]] = json.loads(v)
            continue
        attrs[k] = v.item() if isinstance(v, np.generic) else (v.tolist() if isinstance(v, np.ndarray) else v)
    return attrs


def _load_h5(p: Path) -> FeatureSet:
    try:
        with h5py.File(p, "r") as f:
            feats = np.asarray(f["features"][:], dtype=np.float32)
            coords = np.asarray(f["coords"][:], dtype=np.int64) if "coords" in f else None
            attrs = _h5_root_attrs(f)
            if "coords" in f:
                attrs.setdefault("coords_attrs", {k: jsonable(v) for k, v in f["coords"].attrs.items()})
    except (OSError, KeyError) as exc:
        raise StoreError(f"{p}: not a readable CLAM/TRIDENT feature file ({type(exc).__name__}: {exc})") from exc
    if feats.ndim == 3 and feats.shape[0] == 1:  # some pipelines save (1, N, D)
        feats = feats[0]
    if coords is None:
        coords = np.full((len(feats), 2), -1, np.int64)
    coords = coords.reshape(-1, 2)
    if len(coords) != len(feats):
        raise StoreError(f"{p}: {len(feats)} feature rows but {len(coords)} coords")
    return FeatureSet(feats, coords, attrs, str(attrs.get("slide_id") or slide_id_of_store(p)))


def _load_csv(p: Path) -> FeatureSet:
    import pandas as pd

    df = pd.read_csv(p)
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed:")])
    feature_cols = sorted((c for c in df.columns if re.fullmatch(r"\d+", str(c))), key=lambda c: int(c))
    if not feature_cols:
        raise StoreError(f"{p}: no feature columns named 0..D-1 (not a SlideChat feature CSV)")
    if [int(c) for c in feature_cols] != list(range(len(feature_cols))):
        raise StoreError(f"{p}: feature columns are not 0..{len(feature_cols) - 1}")
    feats = df[feature_cols].to_numpy(dtype=np.float32)
    if "patch_name" in df.columns:
        coords = np.empty((len(df), 2), np.int64)
        for i, name in enumerate(df["patch_name"].astype(str)):
            m = _PATCH_NAME.search(name.strip())
            if m is None:
                raise StoreError(f"{p}: row {i}: patch_name {name!r} is not '{{x}}_{{y}}.jpeg'")
            coords[i] = (int(m.group(1)), int(m.group(2)))
        has_coords = True
    else:  # SlideChat's loader only uses the first 512 columns; a CSV without names still has features
        coords = np.full((len(df), 2), -1, np.int64)
        has_coords = False
    attrs = {"source": "slidechat_csv", "source_file": str(p), "has_coords": has_coords}
    return FeatureSet(feats, coords, attrs, slide_id_of_store(p))


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def software_versions() -> dict:
    import importlib.metadata as md

    out = {"wsi-slidechat": __version__}
    for pkg in ("torch", "timm", "openslide-python", "openslide-bin", "zarr", "h5py"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _zarr_chunks(n: int, dim: int, chunk_rows: int) -> tuple[int, int]:
    return (max(1, min(chunk_rows, n)), max(1, dim))


class PartialZarrStore:
    """A Zarr store under construction, written chunk by chunk, that survives being killed.

    Every completed row chunk gets a marker file (`.progress/<i>`, written after the chunk's data); on
    restart the chunks with markers are skipped. `finalize` renames the directory into place atomically.
    """

    def __init__(self, path: Path) -> None:
        import zarr

        self.path = path
        self.group = zarr.open_group(str(path), mode="r+")
        self.n = int(self.group["coords"].shape[0])
        self.chunk_rows = int(self.group.attrs["chunk_rows"])

    @classmethod
    def create(cls, path: Path, coords: np.ndarray, dim: int, dtype: str, chunk_rows: int, attrs: dict) -> "PartialZarrStore":
        import zarr

        if path.exists():
            shutil.rmtree(path)
        # Built beside its name and renamed: a partial store is either absent or has all its metadata.
        init = path.with_name(path.name + ".init")
        if init.exists():
            shutil.rmtree(init)
        n = len(coords)
        g = zarr.open_group(str(init), mode="w", zarr_format=3)
        g.create_array("features", shape=(n, dim), chunks=_zarr_chunks(n, dim, chunk_rows), dtype=dtype, fill_value=0)
        g.create_array("coords", shape=(n, 2), chunks=(max(1, n), 2), dtype="int32", fill_value=0)
        g.create_array("valid", shape=(n,), chunks=(max(1, min(chunk_rows, n)),), dtype="bool", fill_value=False)
        if n:
            g["coords"][:] = coords.astype(np.int32)
        g.attrs.update({**attrs, "chunk_rows": int(chunk_rows), "complete": False})
        (init / ".progress").mkdir()
        del g
        init.replace(path)
        return cls(path)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_rows)

    def chunk_rows_of(self, i: int) -> tuple[int, int]:
        return i * self.chunk_rows, min(self.n, (i + 1) * self.chunk_rows)

    def done_chunks(self) -> set[int]:
        return {int(p.name) for p in (self.path / ".progress").iterdir() if p.name.isdigit()}

    def write_chunk(self, i: int, features: np.ndarray, valid: np.ndarray, info: dict | None = None) -> None:
        """Write row chunk `i` and then its marker; `info` (e.g. the chunk's read errors) goes in the marker."""
        a, b = self.chunk_rows_of(i)
        arr = self.group["features"]
        with np.errstate(over="ignore"):  # overflow is detected and reported just below
            data = features.astype(arr.dtype, copy=False)
        if not np.isfinite(data).all():
            raise StoreError(
                f"{self.path}: non-finite features in rows {a}..{b - 1} after casting to {arr.dtype} "
                f"(store features as float32: option --dtype float32)"
            )
        arr[a:b] = data
        self.group["valid"][a:b] = valid
        marker = self.path / ".progress" / str(i)
        tmp = marker.with_name(f".{i}.tmp")
        tmp.write_text(json.dumps(info or {}) + "\n")
        tmp.replace(marker)  # the marker appears only after the chunk's data is on disk

    def marker_infos(self) -> dict[int, dict]:
        """The `info` of every finished chunk (also those written by an earlier, interrupted run)."""
        out = {}
        for i in sorted(self.done_chunks()):
            try:
                out[i] = json.loads((self.path / ".progress" / str(i)).read_text() or "{}")
            except ValueError:
                out[i] = {}
        return out

    def read_valid(self) -> np.ndarray:
        return np.asarray(self.group["valid"][:], bool)

    def finalize(self, final: Path, extra_attrs: dict) -> Path:
        self.group.attrs.update({**extra_attrs, "complete": True})
        shutil.rmtree(self.path / ".progress")
        if final.exists():
            shutil.rmtree(final)
        self.path.replace(final)
        return final


def write_zarr_store(
    final: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    valid: np.ndarray | None,
    attrs: dict,
    dtype: str = "float16",
    chunk_rows: int = 2048,
) -> Path:
    """Write a complete Zarr store in one go (atomically): import, conversion, tests."""
    final = Path(final)
    features = np.asarray(features, np.float32).reshape(len(coords), -1)
    valid = np.ones(len(coords), bool) if valid is None else np.asarray(valid, bool)
    with atomic_path(final, is_dir=True) as tmp:
        store = PartialZarrStore.create(tmp, np.asarray(coords), features.shape[1], dtype, chunk_rows, attrs)
        for i in range(store.n_chunks):
            a, b = store.chunk_rows_of(i)
            store.write_chunk(i, features[a:b], valid[a:b])
        store.group.attrs.update({"complete": True})
        shutil.rmtree(tmp / ".progress")
    return final


def write_h5_store(
    final: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    valid: np.ndarray | None,
    attrs: dict,
    coords_attrs: dict | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a CLAM/TRIDENT H5 feature file (valid rows only), atomically."""
    final = Path(final)
    valid = np.ones(len(coords), bool) if valid is None else np.asarray(valid, bool)
    feats = np.asarray(features)[valid].astype(dtype)
    xy = np.asarray(coords, np.int64).reshape(-1, 2)[valid]
    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats, chunks=(max(1, min(len(feats), 2048)), max(1, feats.shape[1]))
                             if feats.size else None)
            dset = f.create_dataset("coords", data=xy)
            for k, v in (coords_attrs or {}).items():
                if v is not None:
                    dset.attrs[k] = np.asarray(v) if isinstance(v, list) else v
            for k, v in {**attrs, "invalid_indices": np.flatnonzero(~valid).tolist()}.items():
                if v is None:
                    continue
                if isinstance(v, (dict, list)):
                    f.attrs[f"{k}_json"] = json.dumps(v)
                else:
                    f.attrs[k] = v
    return final


def convert_store(src: str | Path, dst: str | Path, dtype: str | None = None) -> Path:
    """Copy a Zarr store into another format by the destination's suffix (.zarr or .h5)."""
    import zarr

    src, dst = Path(src), Path(dst)
    if store_kind(src) != "zarr":
        raise StoreError(f"{src}: convert_store reads Zarr stores")
    g = zarr.open_group(str(src), mode="r")
    feats = np.asarray(g["features"][:], np.float32)
    coords = np.asarray(g["coords"][:], np.int64)
    valid = np.asarray(g["valid"][:], bool)
    attrs = {k: v for k, v in g.attrs.items() if k not in {"complete", "chunk_rows"}}
    if store_kind(dst) == "h5":
        return write_h5_store(dst, feats, coords, valid, attrs, attrs.get("coords_attrs"), dtype or "float32")
    return write_zarr_store(dst, feats, coords, valid, attrs, dtype or str(g["features"].dtype))


# --------------------------------------------------------------------------------------------------
# SlideChat CSV
# --------------------------------------------------------------------------------------------------
def export_csv(store: str | Path, out_csv: str | Path) -> Path:
    """Write a store's valid patches as a SlideChat feature CSV (`0..D-1,patch_name`)."""
    import pandas as pd

    fs = load_features(store)
    df = pd.DataFrame(fs.features.astype(np.float32), columns=[str(i) for i in range(fs.dim)])
    df["patch_name"] = [f"{int(x)}_{int(y)}.jpeg" for x, y in fs.coords]
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return Path(out_csv)


def import_csv(
    csv_path: str | Path,
    out_store: str | Path,
    encoder: str = "conch_v1",
    transform: str = "slidechat",
    dtype: str | None = None,
) -> Path:
    """A SlideChat feature CSV as one of our stores (`.zarr` or `.h5` by suffix), provenance recorded.

    The defaults record SlideChat's released features (CONCH on 224 px patches); pass what you know.
    """
    fs = _load_csv(Path(csv_path))
    attrs = {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "slide_id": fs.slide_id,
        "encoder": encoder,
        "transform": transform,
        "feature_dim": fs.dim,
        "checkpoint_sha256": None,
        "source": "slidechat_csv",
        "source_file": str(Path(csv_path).resolve()),
        "has_coords": fs.attrs["has_coords"],
        "n_patches": len(fs),
        "n_valid": len(fs),
        "software": software_versions(),
    }
    out_store = Path(out_store)
    if store_kind(out_store) == "h5":
        return write_h5_store(out_store, fs.features, fs.coords, None, attrs, None, dtype or "float32")
    # float32 by default: the CSV's values are kept as they were released.
    return write_zarr_store(out_store, fs.features, fs.coords, None, attrs, dtype or "float32")


def export_csv_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m preprocessing export-csv",
                                 description="Write a feature store as a SlideChat CSV (0..D-1, patch_name).")
    ap.add_argument("store", help="<slide_id>.zarr or .h5")
    ap.add_argument("out_csv")
    args = ap.parse_args(argv)
    try:
        path = export_csv(args.store, args.out_csv)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def import_csv_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m preprocessing import-csv",
                                 description="Turn a SlideChat feature CSV into a feature store.")
    ap.add_argument("csv")
    ap.add_argument("out_store", help="<slide_id>.zarr (default format) or <slide_id>.h5")
    ap.add_argument("--encoder", default="conch_v1", help="encoder that made the CSV (recorded; default conch_v1)")
    ap.add_argument("--transform", default="slidechat", help="transform that was used (recorded; default slidechat)")
    ap.add_argument("--dtype", default=None, help="stored feature dtype (default float32)")
    args = ap.parse_args(argv)
    try:
        path = import_csv(args.csv, args.out_store, args.encoder, args.transform, args.dtype)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
