# The built-in demo: synthetic slides in three tissue classes, their instructions and held-out
# benchmark, and a tiny LLM whose tokenizer is trained on the demo text. Active when demo.enabled.


rule make_demo_slides:
    output:
        slides=[SLIDES[s] for s in SLIDES] if DEMO else [],
        labels=f"{DEMO_DIR}/slides/labels.csv",
    log:
        f"{LOG_DIR}/make_demo_slides.log",
    benchmark:
        f"{BENCH_DIR}/make_demo_slides.tsv"
    conda:
        "../../envs/slidechat.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    params:
        out=lambda wildcards, output: parent_dir(output.labels),
        train=config["demo"]["train_per_class"],
        test=config["demo"]["test_per_class"],
        size=config["demo"]["size"],
        seed=config["demo"]["seed"],
    shell:
        "python -m preprocessing synth --out {params.out:q} --train-per-class {params.train} "
        "--test-per-class {params.test} --size {params.size} --seed {params.seed} --workers {threads} > {log:q} 2>&1"


rule make_demo_instructions:
    input:
        labels=rules.make_demo_slides.output.labels,
    output:
        stage1=f"{DEMO_DIR}/instructions/stage1_captions.json",
        stage2=f"{DEMO_DIR}/instructions/stage2_vqa.json",
        benchmark=f"{DEMO_DIR}/instructions/slidebench_demo.csv",
        corpus=f"{DEMO_DIR}/instructions/corpus.txt",
    log:
        f"{LOG_DIR}/make_demo_instructions.log",
    conda:
        "../../envs/slidechat.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
        gpu=0,
    params:
        out=lambda wildcards, output: parent_dir(output.corpus),
        seed=config["demo"]["seed"],
    shell:
        "python -m slidechat demo-instructions --labels {input.labels:q} --out {params.out:q} --seed {params.seed} "
        "> {log:q} 2>&1"


rule make_tiny_llm:
    input:
        corpus=rules.make_demo_instructions.output.corpus,
    output:
        directory(f"{DEMO_DIR}/tiny_llm"),
    log:
        f"{LOG_DIR}/make_tiny_llm.log",
    conda:
        "../../envs/slidechat.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
        gpu=0,
    params:
        vocab=config["llm"]["tiny"]["vocab_size"],
        hidden=config["llm"]["tiny"]["hidden_size"],
        layers=config["llm"]["tiny"]["num_layers"],
        heads=config["llm"]["tiny"]["num_heads"],
        seed=config["demo"]["seed"],
    shell:
        "python -m slidechat make-tiny-llm --out {output:q} --corpus {input.corpus:q} --vocab-size {params.vocab} "
        "--hidden-size {params.hidden} --num-layers {params.layers} --num-heads {params.heads} "
        "--seed {params.seed} > {log:q} 2>&1"
