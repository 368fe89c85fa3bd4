from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.pipeline.estimate import footprints, format_estimate, stage_costs

    config = smk.params.config
    table = format_estimate(stage_costs(config), footprints(config), config)
    print(table, flush=True)  # to the terminal: this rule exists to be read before submitting
    with open(smk.log[0], "a") as log:
        log.write(table + "\n")


run_logged(snakemake, main)
