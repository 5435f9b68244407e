# Tissue segmentation and tiling, one job per slide, with wildcard-free aggregate targets.


rule segment_tissue_slide:
    input:
        slide=slide_path,
    output:
        mask=f"{SEG_DIR}/{{slide}}_mask.png",
        thumbnail=f"{SEG_DIR}/{{slide}}_thumbnail.png",
        geojson=f"{SEG_DIR}/{{slide}}.geojson",
        summary=f"{SEG_DIR}/{{slide}}_segmentation.json",
    log:
        f"{LOG_DIR}/segment_tissue/{{slide}}.log",
    benchmark:
        f"{BENCH_DIR}/segment_tissue/{{slide}}.tsv"
    conda:
        "../../envs/slidechat.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
        gpu=0,
    params:
        out=lambda wildcards, output: parent_dir(output.summary),
        mpp=mpp_args,
        seg=stage_args("segmentation", "segmentation"),
    shell:
        "python -m preprocessing segment --slide={input.slide:q} --slide-id={wildcards.slide:q} "
        "--out {params.out:q} {params.mpp} {params.seg} > {log:q} 2>&1"


rule segment_tissue:
    input:
        expand(rules.segment_tissue_slide.output.summary, slide=SLIDES),


rule tile_slide:
    input:
        slide=slide_path,
        mask=rules.segment_tissue_slide.output.mask,
    output:
        coords=f"{PATCH_DIR}/{{slide}}.h5",
        patches=report(
            f"{PATCH_DIR}/{{slide}}_patches.jpg",
            caption="../report/slide_overview.rst",
            category="1. Slides",
            subcategory="Tissue and kept patches",
            labels={"slide": "{slide}"},
        ),
        summary=f"{PATCH_DIR}/{{slide}}_tiling.json",
    log:
        f"{LOG_DIR}/tile/{{slide}}.log",
    benchmark:
        f"{BENCH_DIR}/tile/{{slide}}.tsv"
    conda:
        "../../envs/slidechat.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
        gpu=0,
    params:
        out=lambda wildcards, output: parent_dir(output.coords),
        seg_dir=lambda wildcards, input: parent_dir(input.mask),
        mpp=mpp_args,
        tiling=stage_args("tiling", "tiling"),
        unusual=unusual_slide_args,
    shell:
        "python -m preprocessing tile --slide={input.slide:q} --slide-id={wildcards.slide:q} "
        "--out {params.out:q} --seg-dir {params.seg_dir:q} {params.mpp} {params.tiling} {params.unusual} "
        "> {log:q} 2>&1"


rule tile:
    input:
        expand(rules.tile_slide.output.coords, slide=SLIDES),
