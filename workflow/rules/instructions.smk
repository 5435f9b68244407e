# Instruction data: map records to feature stores, drop and count what cannot be used, and keep
# evaluation slides out of training (leakage guard).


rule build_instructions_stage:
    input:
        source=lambda wc: instruction_source(wc.stage),
        stores=all_feature_stores,
        exclude=lambda wc: list(benchmarks().values())
        + config["instructions"]["exclude_benchmarks"],
    output:
        data=f"{INSTR_DIR}/stage{{stage}}.json",
        manifest=f"{INSTR_DIR}/stage{{stage}}.manifest.json",
    log:
        f"{LOG_DIR}/build_instructions/stage{{stage}}.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    params:
        features_dir=features_dir_of,
        slide_map=(
            f"--slide-map {config['instructions']['slide_map']}"
            if config["instructions"]["slide_map"]
            else ""
        ),
    shell:
        "slidechat build-instructions --input {input.source} --features-dir {params.features_dir} "
        "--out {output.data} --exclude-benchmark {input.exclude} {params.slide_map} > {log} 2>&1"


rule build_instructions:
    input:
        expand(rules.build_instructions_stage.output.data, stage=["1", "2"]),
