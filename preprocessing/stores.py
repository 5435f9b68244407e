"""Per-slide feature stores: Zarr v3 (default), CLAM/TRIDENT H5, and SlideChat CSV import/export.

Zarr store `<slide_id>.zarr` (a directory):
    features (N, D)  float16 by default, chunks of `chunk_rows` rows x all D (one chunk = a contiguous block)
    coords   (N, 2)  int32 level-0 top-left (x, y), in the tiling order of the coords file
    valid    (N,)    bool; False where the patch could not be read (corrupt tile), its features are zero
    attrs: encoder, checkpoint_sha256, seed, transform (+ spec), target_mpp, patch_size, read_level, ...,
           integrity (row count + CRC-32 of every block of `chunk_rows` rows of features, coords and valid)
    All N rows of the coords file are present, row for row; readers use `load_features` (valid rows only).

H5 store `<slide_id>.h5` (CLAM/TRIDENT layout): `features` (N_valid, D) float32 and `coords` (N_valid, 2)
int64 with the coords file's attributes on `coords`; invalid patches are left out (CLAM readers have no
mask) and listed in the root attribute `invalid_indices`. Our own attributes are the root attributes,
`integrity_json` among them.

SlideChat CSV `<slide_id>.csv`: header `0,1,...,D-1,patch_name`, one row per valid patch, no index column,
`patch_name` = `{x}_{y}.jpeg`; this is what SlideChat's loader reads (`pd.read_csv(f).iloc[:, :512]`).

Stores prove they are complete when read: Zarr returns its fill value (zeros, (0, 0) coords) for a chunk
file that is gone, so `load_features` compares every row block with the CRC-32 recorded when the store was
written and refuses a store that differs, naming the rows. Stores of other tools (CLAM/TRIDENT H5,
SlideChat CSV) carry no such record: their shapes, row counts and finiteness are checked, nothing more.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from preprocessing import __version__
from wsicore.cli import command_parser
from wsicore.errors import InputError
from wsicore.files import atomic_path, input_file, jsonable

STORE_FORMAT = "wsi-slidechat-features"
STORE_FORMAT_VERSION = 2  # 2: the `integrity` attribute (row count and per-block checksums)
STORE_SUFFIXES = (".zarr", ".h5", ".csv")  # preference order when one slide has several stores
H5_BLOCK_ROWS = 2048  # H5 feature chunk rows, and the rows per checksum block of H5 stores
MAX_FEATURE_DIM = 1 << 16  # far above any patch encoder (512-2,560); a larger claim is damage, not features
_PATCH_NAME = re.compile(r"(-?\d+)_(-?\d+)(?:\.[A-Za-z0-9]+)?$")
_STRIP_SUFFIXES = (".csv", ".pt", ".pth", ".h5", ".hdf5", ".zarr", ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn",
                   ".json")
# TCGA slide barcode, e.g. TCGA-A7-A0CJ-01Z-00-DX2 (WSI-Bench appends ".<uuid>" to it).
_TCGA_SLIDE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-[0-9]{2}[A-Z]?-[0-9]{2}-[A-Z]{2}[0-9A-Z]*)", re.I)


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
# Slide ids and the feature-store index (one rule for instruction assembly, training and evaluation)
# --------------------------------------------------------------------------------------------------
def normalize_slide_id(name: str) -> str:
    """Slide id from an image name or path: basename without a known extension; TCGA barcodes cut at the
    first dot and printed in upper case (`TCGA-21-1083-01Z-00-DX1.8288ca92.pt` -> `TCGA-21-1083-01Z-00-DX1`)."""
    base = os.path.basename(str(name).strip().rstrip("/"))
    lowered = base.lower()
    for suffix in _STRIP_SUFFIXES:
        if lowered.endswith(suffix):
            base = base[: -len(suffix)]
            break
    m = _TCGA_SLIDE.match(base)
    if m and (len(base) == m.end() or base[m.end()] == "."):
        return m.group(1).upper()
    return base


def tcga_barcode(name: str) -> str | None:
    """The TCGA slide barcode a name starts with (upper case), whatever follows it (`_features`, ` (1)`, a
    uuid); None for other names. The leakage guard compares these, so a suffix cannot hide a slide."""
    m = _TCGA_SLIDE.match(os.path.basename(str(name).strip().rstrip("/")))
    return m.group(1).upper() if m else None


def slide_key(name: str) -> str:
    """How slide ids are compared everywhere (store index, slide maps, leakage guard): the normalised id,
    ignoring case, so `tcga-cr-7395-01a-01-ts1.zarr` is the store of slide `TCGA-CR-7395-01A-01-TS1`."""
    return normalize_slide_id(name).casefold()


@dataclass(frozen=True)
class SlideMapEntry:
    """What a name in a slide map stands for: another slide id and/or a feature store."""

    slide_id: str | None = None
    features: Path | None = None


def read_slide_map(path: str | Path) -> dict[str, SlideMapEntry]:
    """A slide-map CSV, keyed by `slide_key` of its key column.

    Key column: `image` (a name as written in instruction JSON), else `slide` or `slide_id` (a benchmark's
    slide id); headers are case-insensitive. Value columns, at least one: `slide_id` (when it is not the key
    column: the slide id the name stands for, e.g. a sample sheet's id) and `features` (or `path`, `store`:
    the feature store; a relative path is relative to the CSV's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"slide map not found: {path} (option --slide-map)")
    try:
        return _read_slide_map(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise StoreError(f"{path}: not a UTF-8 CSV slide map ({exc}); save it as CSV UTF-8") from exc


def _read_slide_map(path: Path) -> dict[str, SlideMapEntry]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {f.strip().lower(): f for f in (reader.fieldnames or []) if f}
        key = next((header[c] for c in ("image", "slide", "slide_id") if c in header), None)
        sid_col = header.get("slide_id") if header.get("slide_id") != key else None
        store_col = next((header[c] for c in ("features", "path", "store") if c in header), None)
        if key is None or (sid_col is None and store_col is None):
            raise StoreError(f"{path}: a slide map needs a key column (image, slide or slide_id) and a slide_id "
                             f"and/or features column; found: {', '.join(reader.fieldnames or [])}")
        out: dict[str, SlideMapEntry] = {}
        for line, row in enumerate(reader, start=2):
            name = (row.get(key) or "").strip()
            if not name:
                continue
            renamed = (row.get(sid_col) or "").strip() if sid_col else ""
            store = (row.get(store_col) or "").strip() if store_col else ""
            entry = SlideMapEntry(renamed or None, path.parent / store if store else None)  # absolute paths stay
            k = slide_key(name)
            if k in out and out[k] != entry:
                raise StoreError(f"{path}: line {line}: {name!r} is mapped twice, differently (slide ids are "
                                 "compared ignoring case and extension); keep one row per slide")
            out[k] = entry
    return out


class FeatureStoreIndex:
    """Slide id -> feature store, for instruction assembly, training and evaluation alike.

    A slide map entry wins (its `slide_id` renames, its `features` names the store); otherwise the store is
    `<features_dir>/<id>.zarr|.h5|.csv` at the top level or one folder deep (the released
    `TCGA_patch_feat/<TUMOR>/<id>.csv` layout), ids compared by `slide_key`. One slide with several formats:
    `.zarr` before `.h5` before `.csv`; two stores of one format for one id are an error when that id is
    looked up.
    """

    def __init__(self, features_dir: str | Path | None = None, slide_map: dict[str, SlideMapEntry] | None = None):
        self.root = Path(features_dir) if features_dir else None
        if self.root is not None and not self.root.is_dir():
            raise StoreError(f"features directory not found: {self.root} (option --features-dir)")
        self.slide_map = slide_map or {}
        self._stores: dict[str, list[Path]] | None = None

    def resolve(self, name: str) -> tuple[str, Path | None]:
        """(slide id, its store or None) for an image name or slide id."""
        entry = self.slide_map.get(slide_key(name), SlideMapEntry())
        slide_id = entry.slide_id or normalize_slide_id(name)
        if entry.features is not None:
            return slide_id, (entry.features if entry.features.exists() else None)
        return slide_id, self._in_folder(slide_id)

    def find(self, slide_id: str) -> Path | None:
        """The feature store of a slide, or None."""
        return self.resolve(slide_id)[1]

    def _in_folder(self, slide_id: str) -> Path | None:
        if self.root is None:
            return None
        if self._stores is None:
            self._stores = self._scan(self.root)
        found = self._stores.get(slide_key(slide_id), [])
        best = [p for p in found if p.suffix.lower() == found[0].suffix.lower()] if found else []
        if len(best) > 1:
            raise StoreError(f"slide {slide_id}: several feature stores match ({', '.join(map(str, best))}); slide "
                             "ids are compared ignoring case, so keep one of them")
        return best[0] if best else None

    @staticmethod
    def _scan(root: Path) -> dict[str, list[Path]]:
        candidates = list(root.iterdir())
        for sub in list(candidates):
            if sub.is_dir() and sub.suffix.lower() != ".zarr" and not sub.name.startswith("."):
                candidates.extend(sub.iterdir())
        rank = {s: i for i, s in enumerate(STORE_SUFFIXES)}
        found: dict[str, list[Path]] = {}
        for p in sorted(candidates):
            if p.name.startswith(".") or p.suffix.lower() not in rank:  # hidden = in-progress temporary stores
                continue
            found.setdefault(slide_key(p.name), []).append(p)
        return {k: sorted(v, key=lambda p: rank[p.suffix.lower()]) for k, v in found.items()}


# What made a store's features. Stores used together (one training set, one evaluation) must agree on it:
# features of another encoder, checkpoint, transform or patch geometry have the same shape but mean
# something else to the model.
PROVENANCE_KEYS = ("encoder", "checkpoint_sha256", "transform", "target_mpp", "patch_size")


def _provenance(attrs: dict) -> dict:
    return {k: attrs[k] for k in PROVENANCE_KEYS if attrs.get(k) is not None}


def _differences(made: dict, ref: dict) -> tuple[str, str] | None:
    """('key value, ...' of `made`, the same of `ref`) over the keys both record and that differ; None if none."""
    keys = [k for k in made if k in ref and made[k] != ref[k]]
    if not keys:
        return None
    return ", ".join(f"{k} {made[k]!r}" for k in keys), ", ".join(f"{k} {ref[k]!r}" for k in keys)


class SameFeatures:
    """Checks that stores were made the same way (`PROVENANCE_KEYS`, as far as both record them), and, given
    `trained_on` (a model directory and the provenance its model card records), the way the model's training
    stores were made."""

    def __init__(self, trained_on: tuple[str | Path, dict] | None = None) -> None:
        self.first: tuple[Path, dict] | None = None
        self.model: tuple[str, dict] | None = None
        made = _provenance(trained_on[1]) if trained_on is not None else {}
        if made:
            self.model = (str(trained_on[0]), made)

    def add(self, store: Path, attrs: dict) -> None:
        made = _provenance(attrs)
        if not made:  # another tool's store records nothing
            return
        if self.model is not None:
            differ = _differences(made, self.model[1])
            if differ:
                raise StoreError(
                    f"{store}: made with {differ[0]}, but the model {self.model[0]} was trained on features made "
                    f"with {differ[1]} (its model_card.json); its answers on these features would be meaningless: "
                    "use stores extracted as its training stores were")
        if self.first is None:
            self.first = (store, made)
            return
        differ = _differences(made, self.first[1])
        if differ:
            raise StoreError(
                f"{store}: made with {differ[0]}, but {self.first[0]} with {differ[1]}; the stores of one training "
                "set or evaluation must come from one extraction (same encoder, checkpoint, transform and patch "
                "size): re-extract the odd ones or keep them in another folder")


# --------------------------------------------------------------------------------------------------
# Integrity: row counts and per-block checksums, recorded when written, checked when read
# --------------------------------------------------------------------------------------------------
# CRC-32 (zlib) detects lost chunks (read back as fill values) and changed bytes; the record is no
# signature (anyone can rewrite it). It is cheap: checking a 38k x 512 float16 Zarr store is within the noise
# of reading it, a float32 H5 store takes ~40 ms more (benchmarks/bench_store_integrity.py); SHA-256 ~1.5x.
INTEGRITY_ALGORITHM = "crc32"


def _crc(block: np.ndarray) -> str:
    a = np.ascontiguousarray(block)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return f"{zlib.crc32(a.view(np.uint8).reshape(-1)):08x}"


def block_digests(arr: np.ndarray, block_rows: int) -> list[str]:
    """CRC-32 of every block of `block_rows` rows (the last one shorter), as the store records them."""
    return [_crc(arr[a:a + block_rows]) for a in range(0, len(arr), block_rows)]


def _row_ranges(blocks: list[int], block_rows: int, n: int) -> str:
    spans: list[list[int]] = []
    for i in blocks:
        a, b = i * block_rows, min(n, (i + 1) * block_rows) - 1
        if spans and spans[-1][1] == a - 1:
            spans[-1][1] = b
        else:
            spans.append([a, b])
    return ", ".join(f"{a}..{b}" for a, b in spans)


def _damaged(p: Path, slide_id: str, problems: list[str]) -> StoreError:
    return StoreError(f"{p}: damaged feature store of slide {slide_id}: {'; '.join(problems)} (a chunk file is "
                      f"missing or its bytes changed since it was written). Delete the store and re-run feature "
                      f"extraction for slide {slide_id}.")


def _record_geometry(p: Path, record: dict) -> tuple[int, int]:
    """(rows, block_rows) of an integrity record, refusing a record that is not one (edited by hand)."""
    if record.get("algorithm") != INTEGRITY_ALGORITHM:
        raise StoreError(f"{p}: unknown checksum algorithm {record.get('algorithm')!r} in its integrity record")
    try:
        rows, block = int(record["rows"]), int(record["block_rows"])
    except (KeyError, TypeError, ValueError):
        rows = block = -1
    lists = all(isinstance(record.get(k, []), list) for k in ("features", "coords", "valid"))
    if rows < 0 or block < 1 or not lists:
        raise StoreError(f"{p}: its integrity record is malformed (rows {record.get('rows')!r}, block_rows "
                         f"{record.get('block_rows')!r}, checksum lists expected), so the store cannot be checked. "
                         "Delete the store and re-run feature extraction")
    return rows, block


def _verify(p: Path, slide_id: str, record: dict, arrays: dict[str, np.ndarray]) -> None:
    """Refuse arrays whose row count or block checksums differ from the store's integrity record."""
    rows, block = _record_geometry(p, record)
    problems = []
    for name, arr in arrays.items():
        want = record.get(name)
        if arr is None or want is None:
            problems.append(f"{name} is missing")
        elif len(arr) != rows:
            problems.append(f"{name} has {len(arr)} rows, {rows} were written")
        else:
            bad = [i for i, (got, w) in enumerate(zip(block_digests(arr, block), want)) if got != w]
            if len(want) != -(-rows // block):
                problems.append(f"{name} has {len(want)} recorded checksums for {rows} rows")
            elif bad:
                problems.append(f"{name} rows {_row_ranges(bad, block, rows)} differ")
    if problems:
        raise _damaged(p, slide_id, problems)


def _check_finite(p: Path, slide_id: str, features: np.ndarray, rows: np.ndarray | None = None) -> None:
    """Refuse NaN/inf features, naming the store rows (`rows` maps feature rows to store rows)."""
    finite = np.isfinite(features)
    if finite.all():
        return
    bad = np.flatnonzero(~finite.all(axis=1))
    bad = rows[bad] if rows is not None else bad
    shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
    raise StoreError(f"{p}: {len(bad)} patch row(s) of slide {slide_id} hold NaN/inf features (rows {shown}); "
                     f"re-run feature extraction for slide {slide_id} (at float32 if float16 overflowed)")


def _numeric(p: Path, what: str, a: np.ndarray) -> np.ndarray:
    """`a` if it holds real numbers (another tool's store may hold text or complex values)."""
    if a.dtype.kind not in "fiu":
        raise StoreError(f"{p}: {what} are not numbers (dtype {a.dtype}); not a feature store this project reads")
    return a


def non_pixel_rows(coords: np.ndarray) -> np.ndarray:
    """Rows of float (N, 2) coordinates that are not whole level-0 pixels an int64 holds (NaN, inf, fractions,
    beyond 2**62): cast as they are, they would become other positions without a word."""
    if coords.size == 0:
        return np.empty(0, np.intp)
    ok = np.isfinite(coords) & (coords == np.round(coords)) & (np.abs(coords) < 2**62)
    return np.flatnonzero(~ok.reshape(len(coords), -1).all(axis=1))


def _pixel_coords(p: Path, coords: np.ndarray) -> np.ndarray:
    """Another tool's coords as int64, refusing non-integral or non-finite positions and repeated patches."""
    coords = _numeric(p, "coords", coords)
    if coords.dtype.kind == "f":
        bad = non_pixel_rows(coords)
        if len(bad):
            raise StoreError(f"{p}: coords are not whole pixel positions at {len(bad)} row(s) (row {bad[0]}: "
                             f"{coords[bad[0]].tolist()}); not usable as patch coordinates")
    coords = coords.astype(np.int64)
    if len(coords) and not (coords == -1).all():  # -1: a store without coordinates
        places, counts = np.unique(coords, axis=0, return_counts=True)
        if (counts > 1).any():
            first = int(np.flatnonzero(counts > 1)[0])
            x, y = places[first]
            raise StoreError(f"{p}: {counts[first]} rows at the same coordinates ({x}, {y}) ({int((counts > 1).sum())} "
                             "such place(s)): a patch is listed more than once (were two extractions concatenated?); "
                             "re-extract the slide or keep one row per patch")
    return coords


def _unsealed(p: Path, slide_id: str) -> StoreError:
    return StoreError(
        f"{p}: feature store without an integrity record (written before store format {STORE_FORMAT_VERSION}), so "
        f"a lost chunk would read as zeros unnoticed. Re-create it (delete it and re-run feature extraction for "
        f"slide {slide_id}), or check and seal it once with: python -m preprocessing seal-store {p}"
    )


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
    """Features of one slide from a Zarr store, a CLAM/TRIDENT H5 file, or a SlideChat CSV (valid rows only).

    Our stores are checked against their integrity record (row count, per-block checksums); every store
    is checked for shapes and NaN/inf. A store that fails is refused with a `StoreError` naming the rows.
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"feature store not found: {p}")
    kind = store_kind(p)
    if kind == "zarr":
        return _load_zarr(p)
    if kind == "h5":
        return _load_h5(p)
    return _load_csv(p)


def count_patches(path: str | Path) -> int:
    """Usable patches of a store, after the checks `load_features` makes. SlideChat CSVs (large, and
    without a record to check) are only opened here: header and row presence; their values are checked when
    they are loaded for training or evaluation."""
    p = Path(path)
    if p.exists() and store_kind(p) == "csv":
        with open(p, newline="") as fh:
            header, first = fh.readline(), fh.readline()
        if not re.search(r"(^|,)\"?0\"?(,|$)", header):
            raise StoreError(f"{p}: no feature columns named 0..D-1 (not a SlideChat feature CSV)")
        return int(bool(first.strip()))  # 0 = no patches; otherwise at least one (not counted: files are large)
    return len(load_features(p))


def read_store_attrs(path: str | Path) -> dict:
    """Attributes of a store without reading its arrays."""
    p = Path(path)
    kind = store_kind(p)
    try:
        if kind == "zarr":
            import zarr

            return dict(zarr.open_group(str(p), mode="r").attrs)
        if kind == "h5":
            with h5py.File(p, "r") as f:
                return _h5_root_attrs(f)
    except (OSError, ValueError, KeyError) as exc:  # zarr's "no group found" is both
        raise StoreError(f"{p}: not a readable feature store ({type(exc).__name__}: {exc})") from exc
    return {}


def _read_zarr_array(p: Path, slide_id: str, group: Any, name: str, block_rows: int) -> np.ndarray:
    """One array of a Zarr store; a chunk that no longer decodes is reported with its rows."""
    arr = group[name]
    try:
        return np.asarray(arr[:])
    except (RuntimeError, ValueError) as exc:  # numcodecs: "Zstd decompression error: ..."
        n, bad = arr.shape[0], []
        for i, a in enumerate(range(0, n, block_rows)):
            try:
                arr[a:a + block_rows]
            except (RuntimeError, ValueError):
                bad.append(i)
        raise _damaged(p, slide_id, [f"{name} rows {_row_ranges(bad, block_rows, n)} cannot be decoded ({exc})"]) from exc


def _read_zarr(p: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Features (stored dtype), coords, valid and attributes of one of our Zarr stores, checked."""
    import zarr

    try:
        g = zarr.open_group(str(p), mode="r")
        attrs = dict(g.attrs)
        missing = [k for k in ("features", "coords", "valid") if k not in g]
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise StoreError(f"{p}: not a readable feature store ({type(exc).__name__}: {exc})") from exc
    slide_id = str(attrs.get("slide_id") or slide_id_of_store(p))
    if missing:
        raise StoreError(f"{p}: not a feature store: no {', '.join(missing)} array(s)")
    record = attrs.get("integrity")
    if not isinstance(record, dict) or "features" not in record:
        raise _unsealed(p, slide_id)
    if attrs.get("complete") is not True:
        raise StoreError(f"{p}: incomplete feature store; re-run feature extraction for slide {slide_id}")
    rows, block = _record_geometry(p, record)
    claimed = [f"{k} has {g[k].shape[0]} rows, {rows} were written" for k in ("features", "coords", "valid")
               if g[k].shape[0] != rows]
    shapes = {k: tuple(g[k].shape[1:]) for k in ("features", "coords", "valid")}
    if not (len(shapes["features"]) == 1 and 0 < shapes["features"][0] <= MAX_FEATURE_DIM) or \
            shapes["coords"] != (2,) or shapes["valid"] != ():
        claimed.append(f"array shapes {', '.join(f'{k} {(g[k].shape)}' for k in shapes)} are not (N, D <= "
                       f"{MAX_FEATURE_DIM}), (N, 2), (N,)")
    if claimed:  # before reading: the array would first be allocated at the size its metadata claims
        raise _damaged(p, slide_id, claimed)
    arrays = {k: _read_zarr_array(p, slide_id, g, k, block) for k in ("features", "coords", "valid")}
    _verify(p, slide_id, record, arrays)
    return arrays["features"], arrays["coords"], arrays["valid"].astype(bool), attrs


def _load_zarr(p: Path) -> FeatureSet:
    feats, coords, valid, attrs = _read_zarr(p)
    slide_id = str(attrs.get("slide_id") or slide_id_of_store(p))
    if valid.all():
        x, xy, rows = feats.astype(np.float32, copy=False), coords, None
    else:
        rows = np.flatnonzero(valid)
        x, xy = feats[rows].astype(np.float32), coords[rows]
    _check_finite(p, slide_id, x, rows)
    return FeatureSet(x, xy.astype(np.int64).reshape(-1, 2), attrs, slide_id)


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
            for name in ("features", "coords"):
                if name in f:
                    _check_h5_claim(p, f[name])
            feats = np.asarray(f["features"][:])
            coords = np.asarray(f["coords"][:]) if "coords" in f else None
            attrs = _h5_root_attrs(f)
            if "coords" in f:
                attrs.setdefault("coords_attrs", {k: jsonable(v) for k, v in f["coords"].attrs.items()})
    except (OSError, KeyError) as exc:
        raise StoreError(f"{p}: not a readable CLAM/TRIDENT feature file ({type(exc).__name__}: {exc})") from exc
    slide_id = str(attrs.get("slide_id") or slide_id_of_store(p))
    record = attrs.get("integrity")
    if isinstance(record, dict):
        _verify(p, slide_id, record, {"features": feats, "coords": coords})
    elif attrs.get("format") == STORE_FORMAT:
        raise _unsealed(p, slide_id)
    elif feats.ndim == 3 and feats.shape[0] == 1:  # other tools: some pipelines save (1, N, D)
        feats = feats[0]
    if feats.ndim != 2:
        raise StoreError(f"{p}: features have shape {feats.shape}; expected (patches, feature_dim)")
    if coords is None:
        coords = np.full((len(feats), 2), -1, np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        coords = coords.reshape(-1, 2) if coords.ndim == 3 and coords.shape[0] == 1 else coords
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise StoreError(f"{p}: coords have shape {coords.shape}; expected (patches, 2)")
    if len(coords) != len(feats):
        raise StoreError(f"{p}: {len(feats)} feature rows but {len(coords)} coords")
    x = _numeric(p, "features", feats).astype(np.float32, copy=False)
    _check_finite(p, slide_id, x)
    if not isinstance(record, dict):  # ours were checked against their record
        coords = _pixel_coords(p, coords)
    return FeatureSet(x, coords.astype(np.int64, copy=False), attrs, slide_id)


def _check_h5_claim(p: Path, dset: Any) -> None:
    """Refuse a dataset whose shape claims far more bytes than the file stores for it: unwritten chunks read
    as zeros, and reading first allocates the claimed size (a tiny file can claim terabytes)."""
    claimed, stored = int(dset.size) * dset.dtype.itemsize, int(dset.id.get_storage_size())
    if claimed > 1000 * stored + (1 << 20):  # compression of real features is nowhere near 1000:1
        raise StoreError(f"{p}: {dset.name.lstrip('/')} claim {claimed:,} bytes but the file stores {stored:,} "
                         "(chunks never written, read as zeros); not a complete feature file")


def _load_csv(p: Path) -> FeatureSet:
    import pandas as pd

    df = pd.read_csv(p)
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed:")])
    feature_cols = sorted((c for c in df.columns if re.fullmatch(r"\d+", str(c))), key=lambda c: int(c))
    if not feature_cols:
        raise StoreError(f"{p}: no feature columns named 0..D-1 (not a SlideChat feature CSV)")
    if [int(c) for c in feature_cols] != list(range(len(feature_cols))):
        raise StoreError(f"{p}: feature columns are not 0..{len(feature_cols) - 1}")
    try:
        feats = df[feature_cols].to_numpy(dtype=np.float32)
    except ValueError as exc:
        raise StoreError(f"{p}: a feature column holds something other than numbers ({exc})") from exc
    _check_finite(p, slide_id_of_store(p), feats)
    if "patch_name" in df.columns:
        coords = np.empty((len(df), 2), np.int64)
        for i, name in enumerate(df["patch_name"].astype(str)):
            m = _PATCH_NAME.search(name.strip())
            if m is None:
                raise StoreError(f"{p}: row {i}: patch_name {name!r} is not '{{x}}_{{y}}.jpeg'")
            coords[i] = (int(m.group(1)), int(m.group(2)))
        coords = _pixel_coords(p, coords)
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


def _as_stored(data: np.ndarray) -> np.ndarray:
    # Zarr does not write a chunk equal to its fill value, and reads -0.0 back as 0.0 then: checksum that.
    return data if data.any() else np.zeros_like(data)


class PartialZarrStore:
    """A Zarr store under construction, written chunk by chunk, that survives being killed.

    Every completed row chunk gets a marker file (`.progress/<i>`, written after the chunk's data, holding
    the chunk's checksums); on restart the chunks with markers are skipped. `finalize` records the checksums
    in the attributes (`integrity`) and renames the directory into place atomically.
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
        xy = np.asarray(coords).astype(np.int32).reshape(-1, 2)
        g = zarr.open_group(str(init), mode="w", zarr_format=3)
        g.create_array("features", shape=(n, dim), chunks=_zarr_chunks(n, dim, chunk_rows), dtype=dtype, fill_value=0)
        g.create_array("coords", shape=(n, 2), chunks=(max(1, n), 2), dtype="int32", fill_value=0)
        g.create_array("valid", shape=(n,), chunks=(max(1, min(chunk_rows, n)),), dtype="bool", fill_value=False)
        if n:
            g["coords"][:] = xy
        integrity = {"algorithm": INTEGRITY_ALGORITHM, "rows": n, "block_rows": int(chunk_rows),
                     "coords": block_digests(_as_stored(xy), chunk_rows)}
        g.attrs.update({**attrs, "chunk_rows": int(chunk_rows), "complete": False, "integrity": integrity})
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
        valid = np.asarray(valid, bool)
        arr[a:b] = data
        self.group["valid"][a:b] = valid
        digests = {"features": _crc(_as_stored(data)), "valid": _crc(valid)}
        marker = self.path / ".progress" / str(i)
        tmp = marker.with_name(f".{i}.tmp")
        tmp.write_text(json.dumps({**(info or {}), "digests": digests}) + "\n")
        tmp.replace(marker)  # the marker appears only after the chunk's data is on disk

    def _markers(self) -> dict[int, dict]:
        out = {}
        for i in sorted(self.done_chunks()):
            try:
                out[i] = json.loads((self.path / ".progress" / str(i)).read_text() or "{}")
            except ValueError:
                out[i] = {}
        return out

    def marker_infos(self) -> dict[int, dict]:
        """The `info` of every finished chunk (also those written by an earlier, interrupted run)."""
        return {i: {k: v for k, v in m.items() if k != "digests"} for i, m in self._markers().items()}

    def read_valid(self) -> np.ndarray:
        return np.asarray(self.group["valid"][:], bool)

    def integrity_record(self) -> dict:
        """The store's integrity record: checksums of every chunk as written (from the markers; chunks
        whose marker predates checksums are checksummed as they are on disk)."""
        missing = sorted(set(range(self.n_chunks)) - self.done_chunks())
        if missing:
            raise StoreError(f"{self.path}: chunks {missing} were never written; re-run feature extraction")
        record = dict(self.attrs.get("integrity") or {})
        if "coords" not in record:  # a partial store begun before stores carried checksums
            record = {"algorithm": INTEGRITY_ALGORITHM, "rows": self.n, "block_rows": self.chunk_rows,
                      "coords": block_digests(np.asarray(self.group["coords"][:]), self.chunk_rows)}
        markers = self._markers()
        for name in ("features", "valid"):
            sums = []
            for i in range(self.n_chunks):
                d = markers[i].get("digests", {}).get(name)
                if d is None:
                    a, b = self.chunk_rows_of(i)
                    d = _crc(np.asarray(self.group[name][a:b]))
                sums.append(d)
            record[name] = sums
        return record

    def read_checked(self) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and valid flags of the finished chunks, checked against their checksums."""
        record = self.integrity_record()
        block = self.chunk_rows
        sid = str(self.attrs.get("slide_id") or self.path.name)
        arrays = {k: _read_zarr_array(self.path, sid, self.group, k, block) for k in ("features", "coords", "valid")}
        _verify(self.path, sid, record, arrays)
        return arrays["features"].astype(np.float32), arrays["valid"].astype(bool)

    def seal(self, extra_attrs: dict | None = None) -> None:
        """Record the checksums and mark the store complete (the chunk markers are then removed)."""
        self.group.attrs.update({**(extra_attrs or {}), "integrity": self.integrity_record(), "complete": True})
        shutil.rmtree(self.path / ".progress")

    def finalize(self, final: Path, extra_attrs: dict) -> Path:
        self.seal(extra_attrs)
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
    features = np.asarray(features, np.float32)
    features = features if features.ndim == 2 else features.reshape(len(coords), -1)
    valid = np.ones(len(coords), bool) if valid is None else np.asarray(valid, bool)
    attrs = {k: v for k, v in attrs.items() if k not in {"integrity", "complete", "chunk_rows"}}
    with atomic_path(final, is_dir=True, replaces="zarr.json") as tmp:
        store = PartialZarrStore.create(tmp, np.asarray(coords), features.shape[1], dtype, chunk_rows, attrs)
        for i in range(store.n_chunks):
            a, b = store.chunk_rows_of(i)
            store.write_chunk(i, features[a:b], valid[a:b])
        store.seal()
    return final


def _h5_integrity(feats: np.ndarray, coords: np.ndarray) -> dict:
    return {"algorithm": INTEGRITY_ALGORITHM, "rows": len(feats), "block_rows": H5_BLOCK_ROWS,
            "features": block_digests(feats, H5_BLOCK_ROWS), "coords": block_digests(coords, H5_BLOCK_ROWS)}


def write_h5_store(
    final: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    valid: np.ndarray | None,
    attrs: dict,
    coords_attrs: dict | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a CLAM/TRIDENT H5 feature file (valid rows only, with our integrity record), atomically."""
    final = Path(final)
    valid = np.ones(len(coords), bool) if valid is None else np.asarray(valid, bool)
    feats = np.asarray(features)[valid].astype(dtype)
    xy = np.asarray(coords, np.int64).reshape(-1, 2)[valid]
    if not np.isfinite(feats).all():
        raise StoreError(f"{final}: non-finite features after casting to {dtype}; store them as float32")
    attrs = {k: v for k, v in attrs.items() if k not in {"complete", "chunk_rows"}}
    attrs.update({"invalid_indices": np.flatnonzero(~valid).tolist(), "integrity": _h5_integrity(feats, xy)})
    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats, chunks=(max(1, min(len(feats), H5_BLOCK_ROWS)),
                                                             max(1, feats.shape[1])) if feats.size else None)
            dset = f.create_dataset("coords", data=xy)
            for k, v in (coords_attrs or {}).items():
                if v is not None:
                    dset.attrs[k] = np.asarray(v) if isinstance(v, list) else v
            for k, v in attrs.items():
                if v is None:
                    continue
                if isinstance(v, (dict, list)):
                    f.attrs[f"{k}_json"] = json.dumps(v)
                else:
                    f.attrs[k] = v
    return final


def convert_store(src: str | Path, dst: str | Path, dtype: str | None = None) -> Path:
    """Copy a Zarr store into another format by the destination's suffix (.zarr or .h5)."""
    src, dst = Path(src), Path(dst)
    if store_kind(src) != "zarr":
        raise StoreError(f"{src}: convert_store reads Zarr stores")
    feats, coords, valid, attrs = _read_zarr(src)
    if store_kind(dst) == "h5":
        return write_h5_store(dst, feats.astype(np.float32), coords, valid, attrs, attrs.get("coords_attrs"),
                              dtype or "float32")
    return write_zarr_store(dst, feats.astype(np.float32), coords, valid, attrs, dtype or str(feats.dtype))


# --------------------------------------------------------------------------------------------------
# Sealing stores written before format version 2
# --------------------------------------------------------------------------------------------------
def seal_store(path: str | Path) -> Path:
    """Check one of our stores written without an integrity record as far as it can be checked, then record
    its checksums, so that damage from now on is detected.

    Checked: the store is complete, every chunk decodes, shapes agree, every block with valid rows has
    features and every block with features has valid rows (a lost chunk reads as zeros / False), coords
    equal the coords file the store records (when it still exists; else they must not all be (0, 0)),
    `n_valid` agrees, and features are finite. Not provable: that feature values are those the encoder
    produced (re-extract when in doubt).
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"feature store not found: {p}")
    attrs = read_store_attrs(p)
    slide_id = str(attrs.get("slide_id") or slide_id_of_store(p))
    if isinstance(attrs.get("integrity"), dict):
        load_features(p)  # already sealed: just check it
        return p
    if store_kind(p) == "h5" and attrs.get("format") == STORE_FORMAT:
        return _seal_h5(p, slide_id)
    if store_kind(p) != "zarr":
        raise StoreError(f"{p}: not a store written by this project; stores of other tools are checked when read "
                         "(shapes, row counts, finite values) and cannot be sealed")
    import zarr

    g = zarr.open_group(str(p), mode="r+")
    if attrs.get("complete") is not True:
        raise StoreError(f"{p}: incomplete feature store; re-run feature extraction for slide {slide_id}")
    block = int(attrs.get("chunk_rows") or g["features"].chunks[0])
    feats, coords, valid = (_read_zarr_array(p, slide_id, g, k, block) for k in ("features", "coords", "valid"))
    n = len(coords)
    problems = [f"{k} has {len(a)} rows, coords {n}" for k, a in (("features", feats), ("valid", valid)) if len(a) != n]
    if problems:
        raise _damaged(p, slide_id, problems)
    valid = valid.astype(bool)
    bad = [i for i, a in enumerate(range(0, n, block))
           if bool(valid[a:a + block].any()) != bool(np.any(feats[a:a + block] != 0))]
    if bad:
        problems.append(f"features or valid flags lost in rows {_row_ranges(bad, block, n)}")
    coords_file = Path(str(attrs.get("coords_file") or ""))
    if attrs.get("coords_file") and coords_file.is_file():
        with h5py.File(coords_file, "r") as f:
            expected = np.asarray(f["coords"][:], np.int64).reshape(-1, 2)
        if expected.shape != coords.shape or not np.array_equal(expected, coords):
            problems.append(f"coords differ from its coords file {coords_file}")
    elif n > 1 and not coords.any():
        problems.append("coords are all (0, 0)")
    if attrs.get("n_valid") is not None and int(attrs["n_valid"]) != int(valid.sum()):
        problems.append(f"{int(valid.sum())} valid rows, {attrs['n_valid']} were written")
    if problems:
        raise _damaged(p, slide_id, problems)
    _check_finite(p, slide_id, feats[valid].astype(np.float32), np.flatnonzero(valid))
    record = {"algorithm": INTEGRITY_ALGORITHM, "rows": n, "block_rows": block,
              **{k: block_digests(a, block) for k, a in (("features", feats), ("coords", coords), ("valid", valid))},
              "sealed_after_writing": True}
    g.attrs.update({"integrity": record})
    return p


def _seal_h5(p: Path, slide_id: str) -> Path:
    with h5py.File(p, "r") as f:
        feats = np.asarray(f["features"][:])
        coords = np.asarray(f["coords"][:]) if "coords" in f else None
        attrs = _h5_root_attrs(f)
    if feats.ndim != 2 or coords is None or coords.shape != (len(feats), 2):
        raise _damaged(p, slide_id, [f"features {feats.shape} and coords {None if coords is None else coords.shape} "
                                     "do not agree"])
    n_valid = attrs.get("n_valid")
    if n_valid is not None and int(n_valid) != len(feats):
        raise _damaged(p, slide_id, [f"{len(feats)} feature rows, {n_valid} were written"])
    _check_finite(p, slide_id, feats.astype(np.float32))
    record = {**_h5_integrity(feats, coords), "sealed_after_writing": True}
    with atomic_path(p) as tmp:
        shutil.copyfile(p, tmp)
        with h5py.File(tmp, "r+") as f:
            f.attrs["integrity_json"] = json.dumps(record)
    return p


def seal_store_main(argv: list[str]) -> int:
    ap = command_parser("python -m preprocessing seal-store",
                        "Check feature stores written before stores carried checksums, and record their checksums.\n"
                        "Checks what can be checked (see docs/features.md); a store that fails is refused, "
                        "naming the rows: re-run feature extraction for that slide.",
                        "python -m preprocessing seal-store results/features/*/*.zarr")
    ap.add_argument("stores", nargs="+", help="<slide_id>.zarr or .h5 stores of this project")
    args = ap.parse_args(argv)
    failed = []
    for s in args.stores:
        try:
            print(f"sealed {seal_store(s)}")
        except StoreError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            failed.append(s)
    if failed:
        raise StoreError(f"{len(failed)} of {len(args.stores)} store(s) could not be sealed (see above)")
    return 0


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
    ap = command_parser("python -m preprocessing export-csv", "Write a feature store as a SlideChat CSV (0..D-1, patch_name).",
                        "python -m preprocessing export-csv results/features/S1.zarr S1.csv")
    ap.add_argument("store", help="<slide_id>.zarr or .h5")
    ap.add_argument("out_csv", help="CSV file to write")
    args = ap.parse_args(argv)
    print(export_csv(args.store, args.out_csv))
    return 0


def import_csv_main(argv: list[str]) -> int:
    ap = command_parser("python -m preprocessing import-csv", "Turn a SlideChat feature CSV into a feature store.",
                        "python -m preprocessing import-csv TCGA_patch_feat/BRCA/S1.csv features/S1.zarr")
    ap.add_argument("csv", help="SlideChat feature CSV (columns 0..D-1[, patch_name])")
    ap.add_argument("out_store", help="<slide_id>.zarr (default format) or <slide_id>.h5")
    ap.add_argument("--encoder", default="conch_v1", help="encoder that made the CSV (recorded)")
    ap.add_argument("--transform", default="slidechat", help="transform that was used (recorded)")
    ap.add_argument("--dtype", default=None, choices=["float16", "float32"], help="stored feature dtype (default float32)")
    args = ap.parse_args(argv)
    input_file(args.csv, "SlideChat feature CSV")
    print(import_csv(args.csv, args.out_store, args.encoder, args.transform, args.dtype))
    return 0
