from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.report.stage import write_tables_from_summary

    write_tables_from_summary(
        smk.input.summary,
        smk.params.out_dir,
        models=smk.params.models,
        benchmarks=smk.params.benchmarks,
        allow_partial=smk.params.allow_partial,
        objectives=smk.params.objectives,
    )


run_logged(snakemake, main)
