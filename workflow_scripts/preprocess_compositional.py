from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.evaluate.compositional import prepare_items

    prepare_items(
        smk.params.benchmark,
        smk.params.paths,
        train_shards=list(smk.input.train_shards),
        out_items=smk.output.table,
        out_leakage=smk.output.leakage,
        order_seed=smk.params.order_seed,
        on_missing_image=smk.params.on_missing_image,
        config=smk.config,
    )


run_logged(snakemake, main)
