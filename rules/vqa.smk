# VQA v2 and TextVQA by the LLaVA-1.5 protocol: one GPU job per model (and chunk, when one job would pass its
# runtime) loads the model once and answers every dataset; the chunks are gathered and scored per dataset.
rule vqa:
    input:
        checkpoint=lambda wildcards: llava_checkpoint(wildcards.model),
        questions=expand(rules.preprocess_vqa.output[0], dataset=VQA_DATASETS),
    output:
        expand(
            run_path("vqa/{{model}}/{dataset}/chunk-{{chunk}}.jsonl"),
            dataset=VQA_DATASETS,
        ),
    log:
        run_path("logs/vqa/{model}/chunk-{chunk}.log"),
    benchmark:
        run_path("benchmarks/vqa/{model}/chunk-{chunk}.tsv")
    conda:
        "../envs/llava.yaml"
    threads: resource("vqa", "threads")
    resources:
        **job_resources("vqa", gpu=True),
    params:
        datasets=VQA_DATASETS,
        # outside the declared outputs: a killed or preempted job resumes from them
        state_dirs=lambda wildcards: [
            run_path(f"state/vqa/{wildcards.model}/{dataset}/chunk-{wildcards.chunk}")
            for dataset in VQA_DATASETS
        ],
        n_chunks=len(VQA_CHUNKS),
        batch_size=config["llava"]["batch_size"],
        max_new_tokens=config["llava"]["max_new_tokens"],
        ocr_datasets=["textvqa"] if config["llava"]["textvqa_ocr"] else [],
        dtype=config["llava"]["dtype"],
    script:
        "../workflow_scripts/vqa.py"


rule score_vqa:
    input:
        chunks=vqa_chunk_files,
        questions=rules.preprocess_vqa.output[0],
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
        **job_resources("default"),
    params:
        references=vqa_references,
        settings=eval_settings(),
    script:
        "../workflow_scripts/score_vqa.py"


rule vqa_all:
    input:
        vqa_outputs(),
