from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.llava.submission import write_submission

    write_submission(
        model=smk.wildcards.model,
        chunk_paths=list(smk.input.chunks),
        questions_parquet=smk.input.questions,
        test_questions_json=smk.params.test_questions,
        out_predictions=smk.output.predictions,
        out_submission=smk.output.submission,
        out_info=smk.output.info,
        config=smk.config,
    )


run_logged(snakemake, main)
