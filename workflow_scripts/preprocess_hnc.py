from pathlib import Path

from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.data.hnc import write_pair_shards

    write_pair_shards(
        smk.params.json,
        Path(smk.output.stats).parent,
        n_shards=smk.params.n_shards,
        images_dir=smk.params.images_dir,
        on_missing_image=smk.params.on_missing_image,
    )


run_logged(snakemake, main)
