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
        ocr_datasets=OCR_DATASETS,
        prompt_variants=PROMPT_VARIANTS,
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
    wildcard_constraints:
        dataset="|".join(SCORED_VQA_DATASETS) or "none",
    conda:
        "../envs/evaluate.yaml"
    resources:
        **job_resources("default"),
    params:
        references=vqa_references,
        settings=eval_settings(),
    script:
        "../workflow_scripts/score_vqa.py"


# VQA v2 test-dev as LLaVA-1.5 reports it: every test2015 question id, answers through the EvalAI processor,
# uploaded by hand; the score comes back with `python -m hnclip.llava.submission import-score` (README).
rule submit_vqa:
    input:
        chunks=vqa_chunk_files,
        questions=rules.preprocess_vqa.output[0],
        test_questions=raw_input("vqav2_test_questions"),
    output:
        predictions=run_path("vqa/{model}/{dataset}/predictions.jsonl"),
        submission=run_path("vqa/{model}/{dataset}/submission.json"),
        info=run_path("vqa/{model}/{dataset}/submission_info.json"),
    log:
        run_path("logs/submit_vqa/{model}/{dataset}.log"),
    wildcard_constraints:
        dataset="vqav2_testdev",
    conda:
        "../envs/evaluate.yaml"
    resources:
        **job_resources("default"),
    params:
        test_questions=lambda wildcards: raw_path("vqav2_test_questions"),
    script:
        "../workflow_scripts/submit_vqa.py"


rule vqa_all:
    input:
        vqa_outputs(),
