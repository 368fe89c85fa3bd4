from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.report.stage import write_summary

    write_summary(
        list(smk.input),
        smk.output.summary,
        models=smk.params.models,
        benchmarks=smk.params.benchmarks,
        allow_partial=smk.params.allow_partial,
    )


run_logged(snakemake, main)
