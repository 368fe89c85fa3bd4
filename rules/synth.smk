rule synth:
    output:
        world=SYNTH_MARKER,
        provenance=f"{SYNTH_DIR}/provenance.json",
        files=[
            SYNTH_PATHS[k]
            for k in SYNTH_PATHS
            if k.startswith(("hnc_", "vqav2_q", "vqav2_a", "textvqa_q", "textvqa_o"))
        ],
        llava_train=[
            p
            for d in SYNTH_LLAVA_TRAIN.values()
            for k, p in d.items()
            if k != "images"
        ],
    log:
        run_path("logs/synth/synth.log"),
    benchmark:
        run_path("benchmarks/synth/synth.tsv")
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        **job_resources("default"),
    params:
        world=config["synth"],
        out_dir=lambda wildcards, output: str(Path(output.world).parent),
    script:
        "../workflow_scripts/synth.py"
