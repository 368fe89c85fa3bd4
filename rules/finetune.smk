rule finetune:
    input:
        baseline=BASELINE_WEIGHTS,
        train=hnc_shards("train"),
        val=hnc_shards("val"),
    output:
        weights=run_path(
            "finetune/alpha~{alpha}/tau~{tau}/seed~{seed}/model.safetensors"
        ),
        train_log=run_path("finetune/alpha~{alpha}/tau~{tau}/seed~{seed}/train_log.csv"),
        provenance=run_path(
            "finetune/alpha~{alpha}/tau~{tau}/seed~{seed}/provenance.json"
        ),
    log:
        run_path("logs/finetune/alpha~{alpha}/tau~{tau}/seed~{seed}.log"),
    benchmark:
        run_path("benchmarks/finetune/alpha~{alpha}/tau~{tau}/seed~{seed}.tsv")
    conda:
        "../envs/train.yaml"
    threads: config["finetune"]["num_threads"]
    resources:
        mem_mb=scaled("finetune", "mem_mb"),
        runtime=scaled("finetune", "runtime"),
        gpu=resource("finetune", "gpu"),
    params:
        settings=finetune_settings,
        model_name=config["model"]["clip_name"],
        # outside the declared outputs: Snakemake never deletes it when it cleans a failed or preempted job
        state_dir=run_path("state/finetune/alpha~{alpha}/tau~{tau}/seed~{seed}"),
    script:
        "../workflow_scripts/train.py"


rule finetune_all:
    input:
        [model_weights(cell) for cell in CELLS],
