from hnclip.workflow import run_logged


def main(smk):
    from hnclip.estimate import format_estimate, stage_costs

    table = format_estimate(stage_costs(smk.params.config))
    print(table, flush=True)  # to the terminal: this rule exists to be read before submitting
    with open(smk.log[0], "a") as log:
        log.write(table + "\n")


run_logged(snakemake, main)
