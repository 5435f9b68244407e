"""`python -m preprocessing <command> ...`: one entry per stage, called by the Snakemake rules."""

from __future__ import annotations

import sys

from wsicore.cli import Command, dispatch

COMMANDS = {
    "segment": Command("preprocessing.tissue:main", "tissue mask, contours and GeoJSON of one slide"),
    "tile": Command("preprocessing.tiling:main", "patch coordinates at a target µm/px (CLAM/TRIDENT coords H5)"),
    "extract": Command("preprocessing.extract:main", "patch features of one or many slides into feature stores"),
    "synth": Command("preprocessing.synthetic:main", "the demo's synthetic Aperio slides"),
    "summary": Command("preprocessing.summary:main", "per-slide table: tissue area, patches, extraction speed"),
    "export-csv": Command("preprocessing.stores:export_csv_main", "feature store -> SlideChat CSV"),
    "import-csv": Command("preprocessing.stores:import_csv_main", "SlideChat CSV -> Zarr feature store"),
    "seal-store": Command("preprocessing.stores:seal_store_main", "check a store made before checksums, record them"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m preprocessing", COMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
