# wsi-slidechat: whole-slide images -> tissue -> patches -> CONCH features -> instructions ->
# two-stage SlideChat training -> SlideBench evaluation.  `snakemake --cores N all` (the default target).
import copy

from snakemake.utils import min_version, validate

min_version("9.0")

# config.yaml (the demo) is the config unless --configfile names others: those files are then the whole
# config, and keys they leave out take the schema's defaults, so the demo's values never leak into a run.
if not workflow.overwrite_configfiles:
    workflow.configfile("config.yaml")

# The config as written, before the schema fills in defaults: its stage keys are what the rules pass to the
# commands (common.smk, stage_args).
USER_CONFIG = copy.deepcopy(config)


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/preprocessing.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/instructions.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/evaluation.smk"


report_left_out()


rule all:
    default_target: True
    input:
        all_targets(),


onsuccess:
    report_left_out()
    shell("python -m slidechat.timing {BENCH_DIR:q} || true")
