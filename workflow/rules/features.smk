# Patch features per slide into a store named by the feature set (encoder, transform, mpp, size).


rule extract_features_slide:
    input:
        slide=slide_path,
        coords=rules.tile_slide.output.coords,
    output:
        store=(
            directory(f"{FEATURE_DIR}/{{slide}}.zarr")
            if FEATURE_EXT == "zarr"
            else f"{FEATURE_DIR}/{{slide}}.h5"
        ),
    log:
        f"{LOG_DIR}/extract_features/{{slide}}.log",
    benchmark:
        f"{BENCH_DIR}/extract_features/{{slide}}.tsv"
    conda:
        "../../envs/features.yaml"
    threads: max(1, config["features"]["num_workers"])
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0 if config["features"]["device"] == "cpu" else 1,
    params:
        out=lambda wildcards, output: parent_dir(output.store),
        mpp=mpp_arg,
        encoder=config["features"]["encoder"],
        checkpoint=lambda wc: (
            f"--checkpoint {encoder_checkpoint()}" if encoder_checkpoint() else ""
        ),
        transform=(
            f"--transform {config['features']['transform']}"
            if config["features"]["transform"]
            else ""
        ),
        fmt=config["features"]["format"],
        dtype=config["features"]["dtype"],
        batch_size=config["features"]["batch_size"],
        workers=config["features"]["num_workers"],
        device=(
            f"--device {config['features']['device']}"
            if config["features"]["device"] != "auto"
            else ""
        ),
    shell:
        "python -m preprocessing extract --slide {input.slide} --coords {input.coords} "
        "--encoder {params.encoder} {params.checkpoint} {params.transform} --out {params.out} "
        "--format {params.fmt} --dtype {params.dtype} --batch-size {params.batch_size} "
        "--num-workers {params.workers} {params.device} {params.mpp} > {log} 2>&1"


rule extract_features:
    input:
        all_feature_stores,


rule summarize_slides:
    input:
        stores=all_feature_stores,
        tiling=expand(rules.tile_slide.output.summary, slide=SLIDES),
        segmentation=expand(rules.segment_tissue_slide.output.summary, slide=SLIDES),
    output:
        report(
            f"{RESULTS}/summary/slides.tsv",
            category="2. Patches and features",
            labels={"table": "per-slide patches and extraction throughput"},
        ),
    log:
        f"{LOG_DIR}/summarize_slides.log",
    conda:
        "../../envs/preprocessing.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    params:
        seg_dir=lambda wildcards, input: parent_dir(input.segmentation[0]),
        patch_dir=lambda wildcards, input: parent_dir(input.tiling[0]),
        features_dir=features_dir_of,
        bench_dir=BENCH_DIR,
    shell:
        "python -m preprocessing summary --seg-dir {params.seg_dir} --patch-dir {params.patch_dir} "
        "--features-dir {params.features_dir} --bench-dir {params.bench_dir} --out {output} > {log} 2>&1"
