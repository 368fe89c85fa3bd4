import json
from pathlib import Path

from hnclip.workflow import run_logged


def main(smk):
    from hnclip.train import TrainSettings, launch_torchrun, run_training

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
    )
    gpus = int(smk.resources.get("gpu", 0))
    if gpus > 1:  # one cell on several GPUs of one node: torchrun, one process per GPU
        spec_path = Path(smk.params.state_dir) / "spec.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, default=str))
        launch_torchrun(spec_path, gpus)
    else:
        run_training(TrainSettings(**spec.pop("settings")), **spec)


run_logged(snakemake, main)
