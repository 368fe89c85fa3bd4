# VQA v2 and TextVQA by the LLaVA-1.5 protocol: one GPU job per (model, dataset, chunk), gathered and scored.
rule vqa:
    input:
        checkpoint=lambda wildcards: llava_checkpoint(wildcards.model),
        questions=run_path("data/vqa/{dataset}/questions.parquet"),
    output:
        run_path("vqa/{model}/{dataset}/chunk-{chunk}.jsonl"),
    log:
        run_path("logs/vqa/{model}/{dataset}/chunk-{chunk}.log"),
    benchmark:
        run_path("benchmarks/vqa/{model}/{dataset}/chunk-{chunk}.tsv")
    conda:
        "../envs/llava.yaml"
    threads: resource("vqa", "threads")
    resources:
        mem_mb=scaled("vqa", "mem_mb"),
        runtime=scaled("vqa", "runtime"),
        gpu=resource("vqa", "gpu"),
    params:
        # outside the declared outputs: a killed or preempted job resumes from it
        state_dir=run_path("state/vqa/{model}/{dataset}/chunk-{chunk}"),
        n_chunks=config["llava"]["chunks"],
        batch_size=config["llava"]["batch_size"],
        max_new_tokens=config["llava"]["max_new_tokens"],
        use_ocr=lambda wildcards: wildcards.dataset == "textvqa"
        and config["llava"]["textvqa_ocr"],
        dtype=config["llava"]["dtype"],
    script:
        "../workflow_scripts/vqa.py"


rule score_vqa:
    input:
        chunks=vqa_chunk_files,
        questions=run_path("data/vqa/{dataset}/questions.parquet"),
        references=lambda wildcards: list(vqa_references(wildcards).values()),
    output:
        predictions=run_path("vqa/{model}/{dataset}/predictions.jsonl"),
        scores=run_path("vqa/{model}/{dataset}/scores.json"),
        per_item=run_path("vqa/{model}/{dataset}/items.parquet"),
    log:
        run_path("logs/score_vqa/{model}/{dataset}.log"),
    conda:
        "../envs/evaluate.yaml"
    resources:
        mem_mb=scaled("default", "mem_mb"),
        runtime=scaled("default", "runtime"),
    params:
        references=vqa_references,
        settings=eval_settings(),
    script:
        "../workflow_scripts/score_vqa.py"


rule vqa_all:
    input:
        vqa_outputs(),
