# The baseline CLIP every cell starts from. Demo: trained here from scratch with the plain CLIP loss.
# Thesis: the downloaded OpenAI ViT-L-14-336, re-saved as safetensors so every later stage loads one format.
if IS_DEMO:

    rule pretrain:
        input:
            train=hnc_shards("train"),
            val=hnc_shards("val"),
        output:
            weights=BASELINE_WEIGHTS,
            train_log=run_path("baseline/train_log.csv"),
            provenance=run_path("baseline/provenance.json"),
        log:
            run_path("logs/pretrain/baseline.log"),
        benchmark:
            run_path("benchmarks/pretrain/baseline.tsv")
        conda:
            "../envs/train.yaml"
        threads: resource("pretrain", "threads")
        resources:
            **job_resources("pretrain", gpu=True),
        params:
            settings=pretrain_settings(),
            model_name=config["model"]["clip_name"],
            state_dir=run_path("state/pretrain"),
        script:
            "../workflow_scripts/train.py"

else:

    rule import_baseline:
        input:
            raw_input("clip_weights"),
        output:
            weights=BASELINE_WEIGHTS,
            provenance=run_path("baseline/provenance.json"),
        log:
            run_path("logs/import_baseline/baseline.log"),
        benchmark:
            run_path("benchmarks/import_baseline/baseline.tsv")
        conda:
            "../envs/train.yaml"
        resources:
            **job_resources("export"),
        params:
            model_name=config["model"]["clip_name"],
            pretrained=raw_path("clip_weights") or config["model"]["clip_pretrained"],
        script:
            "../workflow_scripts/import_baseline.py"
