from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.llava.score import score_vqa

    score_vqa(
        model=smk.wildcards.model,
        dataset=smk.wildcards.dataset,
        chunk_paths=list(smk.input.chunks),
        questions_parquet=smk.input.questions,
        references=smk.params.references,
        out_predictions=smk.output.predictions,
        out_scores=smk.output.scores,
        out_items=smk.output.per_item,
        config=smk.config,
        n_boot=smk.params.settings["n_boot"],
        seed=smk.params.settings["seed"],
    )


run_logged(snakemake, main)
