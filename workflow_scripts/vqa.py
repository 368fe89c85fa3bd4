from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.llava.infer import DatasetChunk, answer_chunk

    datasets = [
        DatasetChunk(dataset, questions, out_jsonl, state_dir, use_ocr=dataset in smk.params.ocr_datasets)
        for dataset, questions, out_jsonl, state_dir in zip(
            smk.params.datasets, smk.input.questions, smk.output, smk.params.state_dirs, strict=True
        )
    ]
    answer_chunk(
        checkpoint_dir=smk.input.checkpoint,
        datasets=datasets,
        n_chunks=smk.params.n_chunks,
        chunk=int(smk.wildcards.chunk),
        batch_size=smk.params.batch_size,
        max_new_tokens=smk.params.max_new_tokens,
        dtype=smk.params.dtype,
    )


run_logged(snakemake, main)
