"""Command-line entry for one training run, e.g. under torchrun for several GPUs on one node:

    torchrun --standalone --nproc_per_node 4 -m hnclip.train spec.json

``spec.json`` holds the keyword arguments of ``hnclip.train.run_training``, with ``settings`` as a dict. Run by
hand (not under torchrun) it is a whole job: ``train_job`` first decides whether the state may be resumed.
"""

import json
import logging
import os
import sys

from hnclip.train import TrainSettings, run_training, train_job


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m hnclip.train SPEC.json")
    with open(argv[0]) as handle:
        spec = json.load(handle)
    if "LOCAL_RANK" not in os.environ:
        train_job(spec)
        return
    settings = TrainSettings(**spec.pop("settings"))  # a torchrun rank: train_job claimed the state already
    run_training(settings, **spec)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
