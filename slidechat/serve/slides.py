"""The slides `slidechat serve` may show, and where each one's segmentation, patches and features are.

The table is built once, at start-up, from `--slides` (a folder of slide files, or a sample sheet CSV with
`slide_id,path[,mpp]` as the workflow reads it). Requests name slides by id only; an id that is not in the
table is unknown, so no path from a request ever reaches the filesystem.

Outputs are looked up in the run's results (`<results>/segmentation/<id>.geojson`,
`<results>/patches/<id>.h5`, `<results>/features/<feature set>/<id>.zarr|.h5`), then in the per-slide cache
that `slidechat ask` and the page's "preprocess" button fill (`<cache>/<id>/segmentation/...`,
`tiles-*/`, `features-*/`). A feature store counts only when it was made the way the model expects
(encoder, transform, µm/px and patch size recorded in the model directory).
"""

from __future__ import annotations

import csv
import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocessing.stores import read_store_attrs
from slidechat.inference import MPP_CACHE_SUFFIX, mpp_cache_suffix
from wsicore.errors import InputError

# The slide formats the workflow discovers in a folder (config key slides.extensions).
SLIDE_EXTENSIONS = ("svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "svslide", "bif", "dcm")
# Sample-sheet ids as the workflow accepts them (workflow/schemas/samples.schema.yaml): an id names files and
# the slide's cache folder, so it must not be a path.
SAMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
FEATURE_KEYS = {"feature_encoder": "encoder", "feature_transform": "transform", "feature_target_mpp": "target_mpp",
                "feature_patch_size": "patch_size"}


@dataclass(frozen=True)
class SlideEntry:
    """One configured slide: its id (the only name requests use), its file and an optional level-0 µm/px."""

    slide_id: str
    path: Path
    mpp: float | None = None


@dataclass(frozen=True)
class SlideOutputs:
    """What preprocessing has produced for a slide so far (None: not there)."""

    geojson: Path | None = None
    coords: Path | None = None
    store: Path | None = None

    @property
    def stage(self) -> str:
        """"ready" (features), "tiled", "segmented" or "new"."""
        if self.store:
            return "ready"
        return "tiled" if self.coords else "segmented" if self.geojson else "new"


def read_slide_table(source: str | Path) -> dict[str, SlideEntry]:
    """Slides from a folder (id = file stem, by extension), one slide file, or a sample sheet CSV
    (`slide_id,path[,mpp]`)."""
    source = Path(source)
    if source.is_dir():
        return _discover(source)
    if source.is_file() and source.suffix.lower().lstrip(".") in SLIDE_EXTENSIONS:
        return {source.stem: SlideEntry(source.stem, source)}
    if source.is_file():
        return _sample_sheet(source)
    raise InputError(f"--slides {source}: no such folder or sample sheet; pass a folder of slides or a CSV "
                     "with columns slide_id,path[,mpp]")


def _discover(folder: Path) -> dict[str, SlideEntry]:
    found: dict[str, SlideEntry] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower().lstrip(".") not in SLIDE_EXTENSIONS:
            continue
        if path.stem in found:
            raise InputError(f"--slides {folder}: slide id {path.stem!r} is ambiguous ({found[path.stem].path.name} "
                             f"and {path.name}); use a sample sheet to name them")
        found[path.stem] = SlideEntry(path.stem, path)
    if not found:
        raise InputError(f"--slides {folder}: no slide files ({', '.join(SLIDE_EXTENSIONS)})")
    return found


def _sample_sheet(sheet: Path) -> dict[str, SlideEntry]:
    try:
        with open(sheet, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError as exc:
        raise InputError(f"--slides {sheet}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); pass a folder, "
                         "a slide file, or a sample sheet CSV saved as UTF-8") from None
    if not rows or not {"slide_id", "path"} <= set(rows[0]):
        raise InputError(f"--slides {sheet}: a sample sheet needs the columns slide_id and path (and optionally mpp)")
    found: dict[str, SlideEntry] = {}
    for n, row in enumerate(rows, start=2):
        slide_id, path = (row.get("slide_id") or "").strip(), (row.get("path") or "").strip()
        if not slide_id or not path:
            raise InputError(f"--slides {sheet} line {n}: empty slide_id or path")
        if not SAMPLE_ID.fullmatch(slide_id):
            raise InputError(f"--slides {sheet} line {n}: slide_id {slide_id!r} must be letters, digits, '_', '.' "
                             "and '-', starting with a letter or digit (as the workflow's sample sheets)")
        if slide_id in found:
            raise InputError(f"--slides {sheet} line {n}: duplicate slide_id {slide_id!r}")
        mpp_text = (row.get("mpp") or "").strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise InputError(f"--slides {sheet} line {n}: mpp {mpp_text!r} is not a number") from None
        if mpp is not None and mpp <= 0:
            raise InputError(f"--slides {sheet} line {n}: mpp must be > 0, got {mpp}")
        found[slide_id] = SlideEntry(slide_id, Path(path), mpp)  # relative paths: from the working directory
    return found


def store_matches(attrs: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a store's attributes agree with the model's recorded feature settings (keys `feature_*`)."""
    for key, attr in FEATURE_KEYS.items():
        if key not in wanted:
            continue
        have, want = attrs.get(attr), wanted[key]
        if isinstance(want, (int, float)) and isinstance(have, (int, float)):
            if abs(float(have) - float(want)) > 1e-9:
                return False
        elif have != want:
            return False
    return True


class OutputFinder:
    """Finds a slide's outputs in the results folder and the per-slide cache."""

    def __init__(self, results_dir: Path | None, cache_dir: Path, wanted_features: dict[str, Any]) -> None:
        self.results_dir = results_dir
        self.cache_dir = cache_dir
        self.wanted = wanted_features

    def cache_of(self, entry: SlideEntry) -> Path:
        """The slide's cache folder (`slidechat ask --work-dir` layout)."""
        return self.cache_dir / entry.slide_id

    def find(self, entry: SlideEntry) -> SlideOutputs:
        # names are matched literally: a slide called `a[1]` must not find the outputs of `a1`
        stem, sid = glob.escape(entry.path.stem), glob.escape(entry.slide_id)
        places: list[tuple[list[Path], list[Path], list[Path]]] = []
        if self.results_dir is not None:
            r = self.results_dir
            places.append(([r / "segmentation" / f"{entry.slide_id}.geojson"], [r / "patches" / f"{entry.slide_id}.h5"],
                           sorted(r.glob(f"features/*/{sid}.zarr")) + sorted(r.glob(f"features/*/{sid}.h5"))))
        c = self.cache_of(entry)
        at = mpp_cache_suffix(entry.mpp)  # `prepare_slide` caches what it made with an mpp override apart

        def cached(pattern: str) -> list[Path]:
            return sorted(p for p in c.glob(pattern) if (p.parent.name.endswith(at) if at else
                                                         not MPP_CACHE_SUFFIX.search(p.parent.name)))

        places.append(([c / f"segmentation{at}" / f"{entry.path.stem}.geojson"], cached(f"tiles-*/{stem}.h5"),
                       cached(f"features-*/{stem}.zarr")))
        geojson = coords = store = None
        for geo_list, coord_list, stores in places:
            geojson = geojson or next((p for p in geo_list if p.is_file()), None)
            coords = coords or next((p for p in coord_list if p.is_file()), None)
            store = store or next((p for p in stores if self._usable(p)), None)
        return SlideOutputs(geojson, coords, store)

    def _usable(self, store: Path) -> bool:
        try:
            attrs = read_store_attrs(store)
        except (OSError, ValueError, KeyError, RuntimeError, InputError):
            return False  # unreadable or half-written: not ready (preprocessing makes it again)
        if store.suffix == ".zarr" and not attrs.get("complete", True):
            return False
        return store_matches(attrs, self.wanted)
