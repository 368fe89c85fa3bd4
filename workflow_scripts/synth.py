from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.io import write_json
    from hnclip.provenance import provenance
    from hnclip.synth import WorldConfig, write_world

    world = WorldConfig.from_dict(smk.params.world)
    counts = write_world(smk.params.out_dir, world)
    # world.json stays byte-identical for a seed; when and by what code it was written lives beside it
    write_json(smk.output.provenance, provenance(world.to_dict(), seed=world.seed, counts=counts))


run_logged(snakemake, main)
