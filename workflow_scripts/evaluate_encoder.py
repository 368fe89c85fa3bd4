from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.evaluate.run import evaluate_encoder

    evaluate_encoder(
        model=smk.wildcards.model,
        model_name=smk.params.model_name,
        weights=smk.input.weights,
        baseline_weights=smk.input.baseline,
        test_shards=list(smk.input.shards),
        zeroshot_root=smk.params.zeroshot_root,
        zeroshot_format=smk.params.zeroshot_format,
        references=smk.params.references,
        outputs=dict(smk.output.items()),
        drift_images=smk.params.drift_images,
        compositional=smk.params.compositional,
        config=smk.config,
        **smk.params.settings,
    )


run_logged(snakemake, main)
