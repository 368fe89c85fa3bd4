from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.llava.stage import export

    export(
        base_dir=smk.params.base_dir,
        model_name=smk.params.model_name,
        weights=smk.input.weights,
        out_dir=smk.output[0],
        config=smk.config,
    )


run_logged(snakemake, main)
