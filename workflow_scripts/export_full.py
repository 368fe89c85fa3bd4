from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.llava.stage import export_full

    export_full(delta_dir=smk.input.delta, out_dir=smk.output[0], config=smk.config)


run_logged(snakemake, main)
