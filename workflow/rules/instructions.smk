# Instruction data: map records to feature stores, drop and count what cannot be used, and keep
# evaluation slides out of training (leakage guard).


rule build_instructions_stage:
    input:
        source=lambda wildcards: instruction_source(wildcards.stage),
        stores=all_feature_stores,
        exclude=excluded_benchmarks(),
        slide_map=slide_map_input,
        leakage_guard=LEAKAGE_GUARD,
    output:
        data=f"{INSTR_DIR}/stage{{stage}}.json",
        manifest=f"{INSTR_DIR}/stage{{stage}}.manifest.json",
    log:
        f"{LOG_DIR}/build_instructions/stage{{stage}}.log",
    conda:
        "../../envs/slidechat.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    params:
        features_dir=features_dir_of,
        exclude=lambda wildcards, input: shell_args(
            {"exclude_benchmark": list(input.exclude)}
        ),
        slide_map=slide_map_args,
        settings=stage_args("instructions", "instructions"),
    shell:
        "python -m slidechat build-instructions --input {input.source:q} --features-dir {params.features_dir:q} "
        "--out {output.data:q} {params.exclude} {params.slide_map} {params.settings} "
        "> {log:q} 2>&1"


rule build_instructions:
    input:
        expand(rules.build_instructions_stage.output.data, stage=["1", "2"]),
