# One job per model evaluates every encoder benchmark: the model is loaded once (one GPU job on SLURM).
rule evaluate_encoder:
    input:
        weights=lambda wildcards: model_weights(wildcards.model),
        baseline=BASELINE_WEIGHTS,
        shards=hnc_shards("test"),
        zeroshot=raw_input("zeroshot"),
        compositional=[compositional_items(b) for b in COMPOSITIONAL],
        references=eval_reference_files,
    output:
        **compositional_eval_outputs(),
        hnc=run_path("eval/{model}/hnc.json"),
        hnc_items=run_path("eval/{model}/hnc_items.parquet"),
        zeroshot=run_path("eval/{model}/zeroshot.json"),
        zeroshot_items=run_path("eval/{model}/zeroshot_items.parquet"),
        drift=run_path("eval/{model}/drift.json"),
    log:
        run_path("logs/evaluate_encoder/{model}.log"),
    benchmark:
        run_path("benchmarks/evaluate_encoder/{model}.tsv")
    conda:
        "../envs/evaluate.yaml"
    threads: resource("evaluate", "threads")
    resources:
        **job_resources("evaluate", gpu=True),
    params:
        references=eval_references,
        zeroshot_root=raw_path("zeroshot"),
        zeroshot_format=config["evaluate"]["zeroshot_format"],
        drift_images=config["evaluate"]["drift_images"],
        compositional={b: compositional_items(b) for b in COMPOSITIONAL},
        model_name=config["model"]["clip_name"],
        settings=eval_settings(),
    script:
        "../workflow_scripts/evaluate_encoder.py"


rule evaluate_all:
    input:
        eval_outputs(),
