# Patch features per slide into a store named by the feature set (encoder, transform, mpp, size).


rule extract_features_slide:
    input:
        slide=slide_path,
        coords=rules.tile_slide.output.coords,
        weights=encoder_weights,
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
        "../../envs/slidechat.yaml"
    threads: max(1, config["features"]["num_workers"] or 1)
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0 if config["features"]["device"] == "cpu" else 1,
    params:
        out=lambda wildcards, output: parent_dir(output.store),
        mpp=mpp_args,
        features=stage_args("features", "features"),
    shell:
        "python -m preprocessing extract --slide={input.slide:q} --slide-id={wildcards.slide:q} "
        "--coords={input.coords:q} --out {params.out:q} {params.features} {params.mpp} > {log:q} 2>&1"


rule extract_features:
    input:
        all_feature_stores,


rule summarize_slides:
    input:
        stores=all_feature_stores,
        tiling=expand(rules.tile_slide.output.summary, slide=SLIDES),
        segmentation=expand(rules.segment_tissue_slide.output.summary, slide=SLIDES),
    output:
        table=f"{RESULTS}/summary/slides.tsv",
        page=report(
            f"{RESULTS}/summary/slides.html",
            caption="../report/slide_table.rst",
            category="2. Patches and features",
            labels={"table": "per slide: µm/px, tissue, patches, extraction"},
        ),
    log:
        f"{LOG_DIR}/summarize_slides.log",
    conda:
        "../../envs/slidechat.yaml"
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
        "python -m preprocessing summary --seg-dir {params.seg_dir:q} --patch-dir {params.patch_dir:q} "
        "--features-dir {params.features_dir:q} --bench-dir {params.bench_dir:q} --out {output.table:q} "
        "--html {output.page:q} > {log:q} 2>&1"
