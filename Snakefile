# hnc-clip: fine-tune CLIP with Hard Negative Captions, then test the tower inside LLaVA-1.5.
# A table of contents: every helper lives in rules/common.smk, every stage in its own file.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/synth.smk"
include: "rules/preprocess.smk"
include: "rules/baseline.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/llava.smk"
include: "rules/vqa.smk"
include: "rules/estimate.smk"


rule all:
    input:
        get_final_output(),
