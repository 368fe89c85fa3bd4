# The demo's base LLaVA, and per model its tower for the base (LLM and projector unchanged), stored alone.
if IS_DEMO:

    rule pretrain_llava:
        input:
            baseline=BASELINE_WEIGHTS,
            train=expand(rules.preprocess_vqa_train.output[0], dataset=VQA_DATASETS),
            captions=hnc_shards("train"),
        output:
            directory(LLAVA_BASE),
        log:
            run_path("logs/pretrain_llava/base.log"),
        benchmark:
            run_path("benchmarks/pretrain_llava/base.tsv")
        conda:
            "../envs/llava.yaml"
        threads: resource("pretrain_llava", "threads")
        resources:
            **job_resources("pretrain_llava", gpu=True),
        params:
            model_name=config["model"]["clip_name"],
            settings=llava_training_settings(),
            seed=config["llava"]["seed"],
            train_log=run_path("llava/base_train_log.csv"),
        script:
            "../workflow_scripts/pretrain_llava.py"


# A model's LLaVA is stored as its tower alone (0.6 GB for LLaVA-1.5-7B), assembled with the base at load.
rule export:
    input:
        base=llava_base_input(),
        weights=lambda wildcards: model_weights(wildcards.model),
    output:
        directory(run_path("llava/{model}")),
    log:
        run_path("logs/export/{model}.log"),
    benchmark:
        run_path("benchmarks/export/{model}.tsv")
    conda:
        "../envs/llava.yaml"
    threads: resource("export", "threads")
    resources:
        **job_resources("export"),
    params:
        base_dir=lambda wildcards: LLAVA_BASE,
        model_name=config["model"]["clip_name"],
    script:
        "../workflow_scripts/export.py"


# One target away for whoever loads a model elsewhere: `snakemake results/<run>/llava_full/<model>` writes the
# complete HF checkpoint (14 GB for LLaVA-1.5-7B), loadable with from_pretrained. Nothing in the run needs it.
rule export_full:
    input:
        delta=run_path("llava/{model}"),
        base=llava_base_input(),
    output:
        directory(run_path("llava_full/{model}")),
    log:
        run_path("logs/export_full/{model}.log"),
    benchmark:
        run_path("benchmarks/export_full/{model}.tsv")
    conda:
        "../envs/llava.yaml"
    threads: resource("export_full", "threads")
    resources:
        **job_resources("export_full"),
    script:
        "../workflow_scripts/export_full.py"
