from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.llava.stage import pretrain_llava

    pretrain_llava(
        baseline_weights=smk.input.baseline,
        model_name=smk.params.model_name,
        train_questions=list(smk.input.train),
        captions=list(smk.input.captions),
        out_dir=smk.output[0],
        log_path=smk.params.train_log,
        settings=smk.params.settings,
        seed=smk.params.seed,
        config=smk.config,
    )


run_logged(snakemake, main)
