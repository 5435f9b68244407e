# Slide discovery, paths and input functions shared by every rule file.
import csv
import json
import re
import shlex
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

RESULTS = config["results_dir"]
DEMO = config["demo"]["enabled"]
DEMO_DIR = f"{RESULTS}/demo"
DEMO_CLASSES = 3  # preprocessing.synthetic.CLASSES


wildcard_constraints:
    slide=r"[^/]+",
    stage=r"[12]",
    benchmark=r"[A-Za-z0-9_.-]+",


def _demo_slides():
    n = DEMO_CLASSES * (
        config["demo"]["train_per_class"] + config["demo"]["test_per_class"]
    )
    return {f"demo-{i:03d}": f"{DEMO_DIR}/slides/demo-{i:03d}.svs" for i in range(n)}


def _sample_sheet_slides(sheet):
    table = pd.read_csv(sheet, dtype={"slide_id": str, "path": str})
    table = table.astype(object).where(table.notna(), None)
    validate(table, "../schemas/samples.schema.yaml")
    if table["slide_id"].duplicated().any():
        dups = sorted(table.loc[table["slide_id"].duplicated(), "slide_id"])
        raise ValueError(f"slides.sample_sheet {sheet}: duplicate slide_id {dups}")
    for row in table.itertuples():
        if getattr(row, "mpp", None):
            config["mpp_overrides"].setdefault(row.slide_id, float(row.mpp))
    return dict(zip(table["slide_id"], table["path"]))


def _discovered_slides(folder, extensions):
    found = {}
    for ext in extensions:
        for variant in sorted({ext.lower(), ext.upper()}):
            for slide_id in glob_wildcards(
                f"{folder}/{{slide_id,[^/]+}}.{variant}"
            ).slide_id:
                path = f"{folder}/{slide_id}.{variant}"
                if slide_id in found and found[slide_id] != path:
                    raise ValueError(
                        f"slide id {slide_id!r} is ambiguous: {found[slide_id]} and {path}"
                    )
                found[slide_id] = path
    return dict(sorted(found.items()))


if DEMO:
    SLIDES = _demo_slides()
elif config["slides"]["sample_sheet"]:
    SLIDES = _sample_sheet_slides(config["slides"]["sample_sheet"])
else:
    SLIDES = _discovered_slides(config["slides"]["dir"], config["slides"]["extensions"])

if not SLIDES:
    raise ValueError(
        f"no slides found in slides.dir={config['slides']['dir']!r} with extensions "
        f"{config['slides']['extensions']}; set slides.dir or slides.sample_sheet (or demo.enabled: true)"
    )

# Output folders. The feature set name encodes everything that changes the features, so a different
# encoder, transform, resolution or patch size never writes into an existing store.
SEG_DIR = f"{RESULTS}/segmentation"
PATCH_DIR = f"{RESULTS}/patches"
_features = config["features"]
FEATURE_SET = re.sub(
    r"[^A-Za-z0-9_.-]",
    "_",
    f"{_features['encoder']}-{_features['transform'] or 'default'}-"
    f"{config['tiling']['target_mpp']:g}um-{config['tiling']['patch_size']}px",
)
FEATURE_DIR = f"{RESULTS}/features/{FEATURE_SET}"
FEATURE_EXT = "zarr" if _features["format"] == "zarr" else "h5"
LOG_DIR = f"{RESULTS}/logs"
BENCH_DIR = f"{RESULTS}/benchmarks"
INSTR_DIR = f"{RESULTS}/instructions"
MODEL_DIR = f"{RESULTS}/models"
CKPT_DIR = (
    f"{RESULTS}/checkpoints"  # training checkpoints: deliberately not a declared output
)
EVAL_DIR = f"{RESULTS}/eval"


def slide_path(wildcards):
    return SLIDES[wildcards.slide]


def mpp_arg(wildcards):
    mpp = config["mpp_overrides"].get(wildcards.slide)
    return f"--mpp {mpp}" if mpp else ""


def segmentation_args():
    seg = config["segmentation"]
    args = [f"--preset {seg['preset']}"] if seg.get("preset") else []
    for key, value in seg.items():
        if key == "allow_unusual_slide":
            args += ["--allow-unusual-slide"] if value else []
        elif key != "preset" and value is not None:
            args.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(args)


def tiling_args():
    t = config["tiling"]
    args = f"--target-mpp {t['target_mpp']} --patch-size {t['patch_size']}"
    if t["min_tissue_fraction"] is not None:
        args += f" --min-tissue-fraction {t['min_tissue_fraction']}"
    return args + (f" --stride {t['stride']}" if t["stride"] else "")


def feature_store(slide):
    return f"{FEATURE_DIR}/{slide}.{FEATURE_EXT}"


def all_feature_stores(wildcards=None):
    return [feature_store(s) for s in SLIDES]


def encoder_checkpoint():
    ckpt = config["features"]["checkpoint"]
    if config["features"]["encoder"] == "conch_v1" and not ckpt:
        raise ValueError(
            "features.checkpoint is required for encoder conch_v1 (CONCH's pytorch_model.bin)"
        )
    if ckpt and not Path(ckpt).exists():
        raise ValueError(f"features.checkpoint: file not found: {ckpt}")
    return ckpt


def llm_dir():
    if config["llm"]["path"]:
        if not Path(config["llm"]["path"]).is_dir():
            raise ValueError(f"llm.path: not a directory: {config['llm']['path']}")
        return config["llm"]["path"]
    if DEMO:
        return f"{DEMO_DIR}/tiny_llm"
    raise ValueError(
        "llm.path is required (a local Hugging Face model directory) unless demo.enabled is true"
    )


def instruction_source(stage):
    key = f"stage{stage}"
    if config["instructions"][key]:
        return config["instructions"][key]
    if DEMO:
        name = "stage1_captions.json" if stage == "1" else "stage2_vqa.json"
        return f"{DEMO_DIR}/instructions/{name}"
    raise ValueError(
        f"instructions.{key} is required (SlideInstruction JSON) unless demo.enabled is true"
    )


def benchmarks():
    found = dict(config["evaluation"]["benchmarks"])
    if DEMO:
        found.setdefault(
            "demo_slidebench", f"{DEMO_DIR}/instructions/slidebench_demo.csv"
        )
    return found


def benchmark_file(wildcards):
    return benchmarks()[wildcards.benchmark]


def train_args(stage):
    s = config["train"][f"stage{stage}"]
    args = [
        f"--{k.replace('_', '-')} {v}" for k, v in s.items() if not isinstance(v, bool)
    ]
    args += [f"--{k.replace('_', '-')}" for k, v in s.items() if v is True]
    m = config["model"]
    args.append(f"--max-patches {m['max_patches_train']}")
    args.append(f"--model-config {shlex.quote(json.dumps(m, sort_keys=True))}")
    if config["train"]["deepspeed"]:
        args.append(f"--deepspeed {config['train']['deepspeed']}")
    if config["train"]["gpus_per_node"]:
        args.append(f"--gpus-per-node {config['train']['gpus_per_node']}")
    args.append(f"--threads {config['train']['threads']}")
    return " ".join(args)


def mpi_launcher(wildcards, resources):
    """`srun` (one rank per task) when the profile gives the rule an `mpi` resource, else nothing."""
    return getattr(resources, "mpi", "") or ""


def parent_dir(path):
    return str(Path(path).parent)


def features_dir_of(wildcards, input):
    return parent_dir(input.stores[0])


def report_inputs():
    return [f"{RESULTS}/summary/slides.tsv"]
