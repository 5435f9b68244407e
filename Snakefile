# wsi-slidechat: whole-slide images -> tissue -> patches -> CONCH features -> instructions ->
# two-stage SlideChat training -> SlideBench evaluation.  `snakemake --cores N all` (the default target).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/preprocessing.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/instructions.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/evaluation.smk"


rule all:
    default_target: True
    input:
        rules.evaluate.input,
        report_inputs(),


onsuccess:
    shell("python -m slidechat.timing {RESULTS}/benchmarks || true")
