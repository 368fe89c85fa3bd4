# hnc-clip: fine-tune CLIP with Hard Negative Captions, then test the tower inside LLaVA-1.5.
# A table of contents: every helper lives in rules/common.smk, every stage in its own file.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/synth.smk"
include: "rules/preprocess.smk"
include: "rules/baseline.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/llava.smk"
include: "rules/vqa.smk"
include: "rules/aggregate.smk"
include: "rules/estimate.smk"


# Cheap jobs run on the submitting host, never as cluster jobs.
localrules:
    all,
    summary,
    tables,
    figures,
    finetune_all,
    evaluate_all,
    vqa_all,
    download_all,


# `snakemake tables figures` rebuilds the views from existing results; add
# --rerun-triggers mtime --config 'report={from_existing: true}' to schedule no model job at all.
rule all:
    input:
        get_final_output(),
