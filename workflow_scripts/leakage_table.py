from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.report.stage import write_leakage_table

    write_leakage_table(list(smk.input), smk.output.csv, smk.output.md)


run_logged(snakemake, main)
