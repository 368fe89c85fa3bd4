from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.train import train_job

    spec = dict(
        settings=dict(smk.params.settings),
        model_name=smk.params.model_name,
        init_weights=smk.input.get("baseline"),
        train_shards=list(smk.input.train),
        val_shards=list(smk.input.val),
        state_dir=smk.params.state_dir,
        out_weights=smk.output.weights,
        out_log=smk.output.train_log,
        out_provenance=smk.output.provenance,
        config=smk.config,
        # how images are read, not what a batch holds: from the config, not a param, so changing it reruns nothing
        loader={"image_cache_bytes": smk.config["finetune"]["image_cache_mb"] * 2**20},
    )
    # several GPUs of one node for one cell: torchrun, one process per GPU
    train_job(spec, gpus=max(1, int(smk.resources.get("gpu", 0))))


run_logged(snakemake, main)
