from hnclip.train import TrainSettings, run_training
from hnclip.workflow import run_logged


def main(smk):
    run_training(
        TrainSettings(**smk.params.settings),
        model_name=smk.params.model_name,
        init_weights=smk.input.get("baseline"),
        train_shards=list(smk.input.train),
        val_shards=list(smk.input.val),
        state_dir=smk.params.state_dir,
        out_weights=smk.output.weights,
        out_log=smk.output.train_log,
        out_provenance=smk.output.provenance,
        config=smk.params.config,
    )


run_logged(snakemake, main)
