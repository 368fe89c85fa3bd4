# Real data and weights into resources/ (entries of resources/manifest.yaml): resumable, verified, atomic.
# Nothing here runs when a config path points at data the user already has.
if config["downloads"]["local"]:

    localrules:
        download,


rule download:
    output:
        "resources/.fetched/{entry}.json",
    log:
        "resources/.fetched/{entry}.log",
    conda:
        "../envs/data.yaml"
    resources:
        runtime=resource("default", "runtime"),
    params:
        manifest=MANIFEST,
        # resources/.fetched/{entry}.json -> resources
        resources_dir=lambda wildcards, output: str(Path(output[0]).parent.parent),
    script:
        "../workflow_scripts/download.py"


rule download_all:
    input:
        download_markers(),
