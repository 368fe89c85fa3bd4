# The base LLaVA and one checkpoint per model with that model's tower swapped in (LLM and projector unchanged).
if IS_DEMO:

    rule pretrain_llava:
        input:
            baseline=BASELINE_WEIGHTS,
            train=expand(
                run_path("data/vqa/{dataset}/train_questions.parquet"),
                dataset=VQA_DATASETS,
            ),
            captions=hnc_shards("train"),
        output:
            directory(LLAVA_BASE),
        log:
            run_path("logs/pretrain_llava/base.log"),
        benchmark:
            run_path("benchmarks/pretrain_llava/base.tsv")
        conda:
            "../envs/llava.yaml"
        threads: config["finetune"]["num_threads"]
        resources:
            mem_mb=scaled("pretrain_llava", "mem_mb"),
            runtime=scaled("pretrain_llava", "runtime"),
            gpu=resource("pretrain_llava", "gpu"),
        params:
            model_name=config["model"]["clip_name"],
            settings=llava_training_settings(),
            seed=config["llava"]["seed"],
            train_log=run_path("llava/base_train_log.csv"),
        script:
            "../workflow_scripts/pretrain_llava.py"


rule export:
    input:
        base=llava_base_input(),
        weights=lambda wildcards: model_weights(wildcards.model),
    output:
        llava_checkpoint_output(run_path("llava/{model}")),
    log:
        run_path("logs/export/{model}.log"),
    conda:
        "../envs/llava.yaml"
    threads: resource("export", "threads")
    resources:
        mem_mb=scaled("export", "mem_mb"),
        runtime=scaled("export", "runtime"),
    params:
        base_dir=lambda wildcards: LLAVA_BASE,
        model_name=config["model"]["clip_name"],
    script:
        "../workflow_scripts/export.py"
