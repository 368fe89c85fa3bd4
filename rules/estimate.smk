# `snakemake estimate` prints the GPU-hours of the configured grid per stage; it submits nothing.
localrules:
    estimate,


rule estimate:
    log:
        run_path("logs/estimate/estimate.log"),
    conda:
        "../envs/report.yaml"
    params:
        config=config,
    script:
        "../workflow_scripts/estimate.py"
