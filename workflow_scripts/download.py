from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.data.manifest import fetch_manifest_entry

    fetch_manifest_entry(smk.wildcards.entry, smk.params.manifest, smk.params.resources_dir)


run_logged(snakemake, main)
