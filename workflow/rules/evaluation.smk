# SlideBench-style evaluation of the stage-2 model, one job per benchmark file.


rule evaluate_benchmark:
    input:
        benchmark=benchmark_file,
        model=rules.train_stage2.output.model,
        llm=llm_dir,
        stores=all_feature_stores,
        manifest=f"{INSTR_DIR}/stage2.manifest.json",
    output:
        outputs=f"{EVAL_DIR}/{{benchmark}}/outputs.csv",
        metrics=f"{EVAL_DIR}/{{benchmark}}/metrics.json",
        report_md=f"{EVAL_DIR}/{{benchmark}}/report.md",
        report_html=report(
            f"{EVAL_DIR}/{{benchmark}}/report.html",
            category="4. Evaluation",
            labels={"benchmark": "{benchmark}", "what": "report"},
        ),
        chart=report(
            f"{EVAL_DIR}/{{benchmark}}/category_accuracy.png",
            category="4. Evaluation",
            labels={"benchmark": "{benchmark}", "what": "per-category accuracy"},
        ),
    log:
        f"{LOG_DIR}/evaluate/{{benchmark}}.log",
    benchmark:
        f"{BENCH_DIR}/evaluate/{{benchmark}}.tsv"
    conda:
        "../../envs/slidechat.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=12 * 60,
        gpu=1,
    params:
        out=lambda wildcards, output: parent_dir(output.metrics),
        features_dir=features_dir_of,
        settings=stage_args("evaluation", "evaluation"),
    shell:
        "python -m slidechat evaluate --benchmark {input.benchmark:q} --features-dir {params.features_dir:q} "
        "--model {input.model:q} --llm {input.llm:q} --out-dir {params.out:q} --train-manifest {input.manifest:q} "
        "{params.settings} > {log:q} 2>&1"


rule evaluate:
    input:
        expand(rules.evaluate_benchmark.output.metrics, benchmark=benchmarks()),
