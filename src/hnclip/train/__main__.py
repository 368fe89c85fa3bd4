"""Command-line entry for one training run, e.g. under torchrun for several GPUs on one node:

    torchrun --standalone --nproc_per_node 4 -m hnclip.train spec.json

``spec.json`` holds the keyword arguments of ``hnclip.train.run_training``, with ``settings`` as a dict.
"""

import json
import logging
import sys

from hnclip.train import TrainSettings, run_training


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m hnclip.train SPEC.json")
    with open(argv[0]) as handle:
        spec = json.load(handle)
    settings = TrainSettings(**spec.pop("settings"))
    run_training(settings, **spec)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
