for hnc_split in HNC_SPLITS:

    rule:
        name:
            f"preprocess_hnc_{hnc_split}"
        input:
            json_ready=raw_input(f"hnc_{hnc_split}"),
            images_ready=raw_input("gqa_images"),
        output:
            shards=hnc_shards(hnc_split),
            stats=run_path(f"data/hnc/{hnc_split}/stats.json"),
        log:
            run_path(f"logs/preprocess_hnc/{hnc_split}.log"),
        benchmark:
            run_path(f"benchmarks/preprocess_hnc/{hnc_split}.tsv")
        conda:
            "../envs/data.yaml"
        threads: 1
        resources:
            **job_resources("default"),
        params:
            json=raw_path(f"hnc_{hnc_split}"),
            images_dir=raw_path("gqa_images"),
            n_shards=config["preprocess"]["hnc_shards"][hnc_split],
            on_missing_image=config["preprocess"]["on_missing_image"],
        script:
            "../workflow_scripts/preprocess_hnc.py"


rule preprocess_vqa:
    input:
        vqa_raw_inputs,
    output:
        run_path("data/vqa/{dataset}/questions.parquet"),
    log:
        run_path("logs/preprocess_vqa/{dataset}.log"),
    benchmark:
        run_path("benchmarks/preprocess_vqa/{dataset}.tsv")
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        **job_resources("default"),
    params:
        dataset="{dataset}",
        paths=lambda wildcards: vqa_raw_paths(wildcards.dataset),
        subsample=lambda wildcards: (
            config["preprocess"]["vqa_subsample"]
            if wildcards.dataset == "vqav2"
            else None
        ),
        seed=config["preprocess"]["subsample_seed"],
        use_ocr=config["llava"]["textvqa_ocr"],
        on_missing_image=config["preprocess"]["on_missing_image"],
    script:
        "../workflow_scripts/preprocess_vqa.py"


# The demo LLaVA's training questions: the synthetic world's train splits, read by the same rule.
use rule preprocess_vqa as preprocess_vqa_train with:
    input:
        SYNTH_MARKER,
    output:
        run_path("data/vqa/{dataset}/train_questions.parquet"),
    log:
        run_path("logs/preprocess_vqa_train/{dataset}.log"),
    benchmark:
        run_path("benchmarks/preprocess_vqa_train/{dataset}.tsv")
    params:
        dataset="{dataset}",
        paths=lambda wildcards: llava_train_paths(wildcards.dataset),
        subsample=None,
        seed=config["preprocess"]["subsample_seed"],
        use_ocr=True,
        on_missing_image=config["preprocess"]["on_missing_image"],


# The compositionality benchmarks as item tables, each item flagged when its image is one HNC trained on.
rule preprocess_compositional:
    input:
        raw=compositional_raw_inputs,
        train_shards=hnc_shards("train"),
    output:
        table=run_path("data/compositional/{benchmark}.parquet"),
        leakage=run_path("data/compositional/{benchmark}_leakage.json"),
    log:
        run_path("logs/preprocess_compositional/{benchmark}.log"),
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        **job_resources("default"),
    params:
        benchmark="{benchmark}",
        paths=lambda wildcards: compositional_raw_paths(wildcards.benchmark),
        order_seed=config["evaluate"]["order_seed"],
        on_missing_image=config["preprocess"]["on_missing_image"],
    script:
        "../workflow_scripts/preprocess_compositional.py"
