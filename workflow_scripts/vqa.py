from hnclip.workflow import run_logged


def main(smk):
    from hnclip.llava.infer import answer_chunk

    answer_chunk(
        checkpoint_dir=smk.input.checkpoint,
        questions_parquet=smk.input.questions,
        n_chunks=smk.params.n_chunks,
        chunk=int(smk.wildcards.chunk),
        out_jsonl=smk.output[0],
        state_dir=smk.params.state_dir,
        batch_size=smk.params.batch_size,
        max_new_tokens=smk.params.max_new_tokens,
        use_ocr=smk.params.use_ocr,
        dtype=smk.params.dtype,
    )


run_logged(snakemake, main)
