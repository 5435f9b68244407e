# Two-stage training. Checkpoints live in CKPT_DIR, outside the declared outputs, because Snakemake
# deletes a rule's outputs before rerunning it; a killed run resumes from there.


rule train_stage1:
    input:
        data=f"{INSTR_DIR}/stage1.json",
        llm=llm_dir,
        stores=all_feature_stores,
    output:
        model=directory(f"{MODEL_DIR}/stage1"),
        curves=report(
            f"{RESULTS}/training/stage1_curves.png",
            caption="../report/training_curves.rst",
            category="3. Training",
            labels={"stage": "1"},
        ),
    log:
        f"{LOG_DIR}/train_stage1.log",
    benchmark:
        f"{BENCH_DIR}/train_stage1.tsv"
    conda:
        "../../envs/slidechat.yaml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=(
            max(1, config["train"]["gpus_per_node"])
            if config["train"]["gpus_per_node"]
            else 0
        ),
    params:
        features_dir=features_dir_of,
        args=train_args("1"),
        launch=mpi_launcher,
        work=f"{CKPT_DIR}/stage1",
    shell:
        "{params.launch} python -m slidechat train --stage 1 --data {input.data:q} "
        "--features-dir {params.features_dir:q} --llm {input.llm:q} --out {output.model:q} "
        "--work-dir {params.work:q} --curves {output.curves:q} --threads {threads} {params.args} > {log:q} 2>&1"


rule train_stage2:
    input:
        data=f"{INSTR_DIR}/stage2.json",
        stage1=rules.train_stage1.output.model,
        llm=llm_dir,
        stores=all_feature_stores,
    output:
        model=directory(f"{MODEL_DIR}/stage2"),
        curves=report(
            f"{RESULTS}/training/stage2_curves.png",
            caption="../report/training_curves.rst",
            category="3. Training",
            labels={"stage": "2"},
        ),
    log:
        f"{LOG_DIR}/train_stage2.log",
    benchmark:
        f"{BENCH_DIR}/train_stage2.tsv"
    conda:
        "../../envs/slidechat.yaml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=32000,
        runtime=48 * 60,
        gpu=(
            max(1, config["train"]["gpus_per_node"])
            if config["train"]["gpus_per_node"]
            else 0
        ),
    params:
        features_dir=features_dir_of,
        args=train_args("2"),
        launch=mpi_launcher,
        work=f"{CKPT_DIR}/stage2",
    shell:
        "{params.launch} python -m slidechat train --stage 2 --data {input.data:q} "
        "--features-dir {params.features_dir:q} --llm {input.llm:q} --model {input.stage1:q} --out {output.model:q} "
        "--work-dir {params.work:q} --curves {output.curves:q} --threads {threads} {params.args} > {log:q} 2>&1"
