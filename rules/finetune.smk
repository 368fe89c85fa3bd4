rule finetune:
    input:
        baseline=BASELINE_WEIGHTS,
        train=hnc_shards("train"),
        val=hnc_shards("val"),
    output:
        weights=run_path("finetune/{cell}/model.safetensors"),
        train_log=run_path("finetune/{cell}/train_log.csv"),
        provenance=run_path("finetune/{cell}/provenance.json"),
    log:
        run_path("logs/finetune/{cell}.log"),
    benchmark:
        run_path("benchmarks/finetune/{cell}.tsv")
    conda:
        "../envs/train.yaml"
    threads: resource("finetune", "threads")
    resources:
        **job_resources("finetune", gpu=True),
    params:
        settings=finetune_settings,
        model_name=config["model"]["clip_name"],
        # outside the declared outputs: Snakemake never deletes it when it cleans a failed or preempted job
        state_dir=run_path("state/finetune/{cell}"),
    script:
        "../workflow_scripts/train.py"


rule finetune_all:
    input:
        [model_weights(cell) for cell in CELLS],
