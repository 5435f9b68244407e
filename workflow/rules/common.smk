# Slide discovery, paths, command arguments and input functions shared by every rule file.
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
import yaml
from snakemake.logging import logger
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

# Standard library only, imported from this checkout (Snakemake puts the Snakefile's folder on sys.path), so
# they work also where our package is not installed (--use-conda).
from wsicore.errors import WORKFLOW_ENV
from wsicore.files import write_text
from wsicore.settings import shell_args

# Jobs inherit this: their errors then name the config key behind a flag (wsicore.errors, config_hint).
os.environ[WORKFLOW_ENV] = "1"

RESULTS = config["results_dir"]
DEMO = config["demo"]["enabled"]
DEMO_DIR = f"{RESULTS}/demo"
DEMO_CLASSES = 3  # preprocessing.synthetic.CLASSES


def _shell_word(path):
    """`path` as one shell word in a command Snakemake formats (braces doubled)."""
    return shlex.quote(str(path)).replace("{", "{{").replace("}", "}}")


# Jobs run the commands of the Python environment that runs Snakemake, so nothing has to be activated
# (`.venv/bin/snakemake` is enough). Under --use-conda each job's environment (envs/slidechat.yaml) provides the
# pinned dependencies and the job imports this checkout's packages: Snakemake clears PYTHONPATH for conda jobs,
# so it is set in the job's shell (the env cannot install the checkout: conda runs its pip from a copy of the
# env file under .snakemake/conda/, where a relative path names .snakemake/).
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(
        f'set -euo pipefail; export PATH={_shell_word(Path(sys.executable).parent)}:"$PATH"; '
    )
else:
    shell.prefix(
        f"set -euo pipefail; export PYTHONPATH={_shell_word(workflow.basedir)}; "
    )


wildcard_constraints:
    slide=r"[^/]+",
    stage=r"[12]",
    benchmark=r"[A-Za-z0-9_.-]+",


def _demo_slides():
    n = DEMO_CLASSES * (
        config["demo"]["train_per_class"] + config["demo"]["test_per_class"]
    )
    return {f"demo-{i:03d}": f"{DEMO_DIR}/slides/demo-{i:03d}.svs" for i in range(n)}


def _check_file_name(path):
    """Snakemake reads `{...}` in any file name as a wildcard, quoted or not: refuse it here, naming the file."""
    if "{" in str(path) or "}" in str(path):
        raise ValueError(
            f"{path}: Snakemake cannot take '{{' or '}}' in a file name; rename the slide "
            "(or list a link to it under another name in slides.sample_sheet)"
        )


def _sample_sheet_slides(sheet):
    table = pd.read_csv(sheet, dtype={"slide_id": str, "path": str})
    table = table.astype(object).where(table.notna(), None)
    validate(table, "../schemas/samples.schema.yaml")
    if table.empty:
        raise ValueError(
            f"slides.sample_sheet {sheet} lists no slides (columns slide_id, path[, mpp])"
        )
    unused = [c for c in table.columns if c not in ("slide_id", "path", "mpp")]
    if unused:
        logger.warning(
            f"slides.sample_sheet {sheet}: columns {', '.join(unused)} are not used (slides are kept out of "
            "training by evaluation.benchmarks and instructions.exclude_benchmarks, not by a split column)"
        )
    if table["slide_id"].duplicated().any():
        dups = sorted(table.loc[table["slide_id"].duplicated(), "slide_id"])
        raise ValueError(f"slides.sample_sheet {sheet}: duplicate slide_id {dups}")
    for row in table.itertuples():
        # A path is data: it reaches commands quoted, and it must name an existing slide file.
        _check_file_name(row.path)
        if not Path(row.path).is_file():
            raise ValueError(
                f"slides.sample_sheet {sheet}: slide {row.slide_id}: path {row.path!r} is not a file"
            )
        # an empty cell: the file's own pixel size (validate() writes empty cells back as NaN)
        if pd.notna(getattr(row, "mpp", None)):
            given = config["mpp_overrides"].setdefault(row.slide_id, float(row.mpp))
            if given != float(row.mpp):
                raise ValueError(
                    f"slide {row.slide_id}: mpp {row.mpp:g} in slides.sample_sheet {sheet} and {given:g} in "
                    "mpp_overrides; keep one"
                )
    return dict(zip(table["slide_id"], table["path"]))


def _discovered_slides(folder, extensions):
    found, skipped = {}, []
    for ext in extensions:
        for variant in sorted({ext.lower(), ext.upper()}):
            for slide_id in glob_wildcards(
                f"{folder}/{{slide_id,[^/]+}}.{variant}"
            ).slide_id:
                path = f"{folder}/{slide_id}.{variant}"
                _check_file_name(path)
                if not Path(path).is_file():
                    # a dangling link or a folder with a slide's name: one slide must not stop the cohort
                    skipped.append(path)
                    continue
                if slide_id in found and found[slide_id] != path:
                    raise ValueError(
                        f"slide id {slide_id!r} is ambiguous: {found[slide_id]} and {path}"
                    )
                found[slide_id] = path
    for path in skipped:
        logger.warning(
            f"slides.dir: skipping {path}: not a readable file (a broken link or a folder); "
            "fix or remove it to include that slide"
        )
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

# An override for an id no slide has would be ignored while the slide it meant kept its file's pixel size.
_unknown_mpp = sorted(set(config["mpp_overrides"]) - set(SLIDES))
if _unknown_mpp:
    raise ValueError(
        f"mpp_overrides: no slide has the id {', '.join(map(repr, _unknown_mpp))}; slide ids are the file names "
        f"without extension, or the sample sheet's slide_id: {', '.join(map(repr, list(SLIDES)[:8]))}"
        + (", ..." if len(SLIDES) > 8 else "")
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

# ---------------------------------------------------------------------------------------- command arguments
_STAGE_SCHEMA = Path(workflow.basedir, "workflow", "schemas", "stages.schema.yaml")
# The keys of each stage block and their flags (x-flag where the flag is not --key), generated from the stage's
# settings dataclass (wsicore.settings).
STAGE_FLAGS = {
    name: {key: prop.get("x-flag") for key, prop in block["properties"].items()}
    for name, block in yaml.safe_load(_STAGE_SCHEMA.read_text())["$defs"].items()
}


def stage_args(block, *path):
    """The flags for a stage's config block, shell-quoted: every key the user wrote (USER_CONFIG, before the
    schema's defaults were filled in) is passed, so false and 0 arrive too; a key left out gets the command's
    default, which the schema documents, and a preset is not overridden by defaults nobody chose.
    """
    values = USER_CONFIG
    for key in path:
        values = values.get(key) or {}
    return shell_args(values, STAGE_FLAGS[block])


def slide_path(wildcards):
    return SLIDES[wildcards.slide]


def mpp_args(wildcards):
    return shell_args({"mpp": config["mpp_overrides"].get(wildcards.slide)})


def unusual_slide_args(wildcards):
    """Tiling checks the slide's sanity bounds again: the segmentation key that lifts them applies there too."""
    return (
        "--allow-unusual-slide" if config["segmentation"]["allow_unusual_slide"] else ""
    )


def feature_store(slide):
    return f"{FEATURE_DIR}/{slide}.{FEATURE_EXT}"


def all_feature_stores(wildcards=None):
    return [feature_store(s) for s in SLIDES]


def parent_dir(path):
    return str(Path(path).parent)


def features_dir_of(wildcards, input):
    return parent_dir(input.stores[0])


def mpi_launcher(wildcards, resources):
    """`srun` (one rank per task) when the profile gives the rule an `mpi` resource, else nothing."""
    return getattr(resources, "mpi", "") or ""


# ---------------------------------------------------------------- keys checked only by the rules that use them
# Called from input functions and params, so `snakemake segment_tissue` starts without an LLM or instructions.


def encoder_weights(wildcards):
    ckpt = config["features"]["checkpoint"]
    if config["features"]["encoder"] == "conch_v1" and not ckpt:
        raise ValueError(
            "features.checkpoint is required for encoder conch_v1 (CONCH's pytorch_model.bin)"
        )
    if ckpt and not Path(ckpt).exists():
        raise ValueError(f"features.checkpoint: file not found: {ckpt}")
    return ckpt or []


def llm_dir(wildcards=None):
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


def excluded_benchmarks():
    """Benchmark files whose slides stay out of training: every evaluation benchmark and the listed others."""
    return sorted(
        set(benchmarks().values()) | set(config["instructions"]["exclude_benchmarks"])
    )


def recorded(path, text):
    """`path`, holding `text`: rewritten (at parse time, dry runs included) only when `text` differs, so its
    mtime says when it last changed and rules that take it as input rerun under `rerun-triggers: mtime`.
    """
    if not Path(path).is_file() or Path(path).read_text() != text:
        write_text(path, text)
    return path


# What decides which records build_instructions keeps (leakage guard): changing the benchmarks, the slide
# map or an assembly setting rebuilds the instructions, and so retrains.
LEAKAGE_GUARD = recorded(
    f"{INSTR_DIR}/leakage_guard.json",
    json.dumps(
        {
            "exclude_benchmarks": excluded_benchmarks(),
            "slide_map": config["instructions"]["slide_map"],
            "settings": stage_args("instructions", "instructions"),
        },
        indent=2,
        sort_keys=True,
    )
    + "\n",
)


def slide_map_input(wildcards):
    return config["instructions"]["slide_map"] or []


def slide_map_args(wildcards, input):
    return shell_args({"slide_map": input.slide_map or None})


def train_args(stage):
    """Flags of `slidechat train` from train.stage<N>, the train-level keys and the `model` section: a params
    function, so train.deepspeed is checked when a training job is planned (not an input: editing the JSON does
    not retrain)."""

    def args(wildcards):
        train = config["train"]
        if train["deepspeed"] and not Path(train["deepspeed"]).is_file():
            raise ValueError(
                f"train.deepspeed: file not found: {train['deepspeed']} (e.g. configs/deepspeed/zero2.json)"
            )
        shared = {
            "deepspeed": train["deepspeed"],
            "gpus_per_node": train["gpus_per_node"],
            "model_config": json.dumps(config["model"], sort_keys=True),
        }
        return f"{stage_args('train_stage', 'train', f'stage{stage}')} {shell_args(shared)}"

    return args


# ------------------------------------------------------------------------------------------- what `all` builds


def _configured():
    """Which products `all` can build with this config, and for each left out, why."""
    has = {
        "stage1": bool(config["instructions"]["stage1"] or DEMO),
        "stage2": bool(config["instructions"]["stage2"] or DEMO),
        "llm": bool(config["llm"]["path"] or DEMO),
        "benchmarks": bool(benchmarks()),
    }
    left_out = []
    if not has["stage1"]:
        left_out.append(
            "build_instructions stage 1, train_stage1, train_stage2: instructions.stage1 is not set"
        )
    if not has["stage2"]:
        left_out.append(
            "build_instructions stage 2, train_stage2: instructions.stage2 is not set"
        )
    if not has["llm"]:
        left_out.append("train_stage1, train_stage2: llm.path is not set")
    if not has["benchmarks"]:
        left_out.append("evaluate: evaluation.benchmarks is empty")
    elif not (has["stage1"] and has["stage2"] and has["llm"]):
        left_out.append("evaluate: there is no stage-2 model to evaluate (see above)")
    return has, left_out


def making_report():
    """True under `snakemake --report FILE` (not --report-after-run, which runs the DAG first)."""
    args = sys.argv[1:]
    return "--report-after-run" not in args and any(
        a == "--report" or a.startswith("--report=") for a in args
    )


def all_targets():
    """Every product whose inputs are configured: feature stores and the slide table always; instructions when
    given; models when the LLM is given too (with or without benchmarks); evaluations when there are benchmarks.
    For a report, only the products that exist, down to each slide's segmentation: a report of a partial run
    shows what was made (a target that does not exist would make Snakemake refuse the report).
    """
    if making_report():
        per_slide = [f"{SEG_DIR}/{s}_segmentation.json" for s in SLIDES]
        per_slide += [f"{PATCH_DIR}/{s}.h5" for s in SLIDES]
        made = [t for t in per_slide + _all_products() if Path(t).exists()]
        logger.info(
            f"report: the {len(made)} of {len(per_slide) + len(_all_products())} products that exist"
        )
        return made
    return _all_products()


def _all_products():
    has, _ = _configured()
    targets = all_feature_stores() + [f"{RESULTS}/summary/slides.html"]
    targets += [f"{INSTR_DIR}/stage{s}.json" for s in ("1", "2") if has[f"stage{s}"]]
    if has["stage1"] and has["llm"]:
        targets.append(f"{MODEL_DIR}/stage1")
        if has["stage2"]:
            targets.append(f"{MODEL_DIR}/stage2")
            targets += [f"{EVAL_DIR}/{name}/metrics.json" for name in benchmarks()]
    return targets


def report_left_out():
    """One line per stage that `all` leaves out with this config (none with the demo)."""
    for line in _configured()[1]:
        logger.info(f"`all` leaves out {line}")
