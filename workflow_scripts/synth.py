from hnclip.synth import WorldConfig, write_world
from hnclip.workflow import run_logged


def main(smk):
    write_world(smk.params.out_dir, WorldConfig(**smk.params.world))


run_logged(snakemake, main)
