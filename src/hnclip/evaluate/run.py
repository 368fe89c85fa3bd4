"""The encoder-evaluation stage: one function per rule, each writing ``{benchmark}.json`` (results-table rows with
provenance) and, where later models are compared against it, the per-item results as Parquet."""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import pandas as pd
import torch

from hnclip.evaluate.compositional import evaluate_benchmark
from hnclip.evaluate.drift import drift_report, fixed_image_sample, measure_drift
from hnclip.evaluate.hnc import pairwise_accuracy_report, pairwise_correctness, pairwise_scores, read_pair_shards
from hnclip.evaluate.zeroshot import (
    read_cifar10,
    read_cifar100,
    read_image_folder,
    zero_shot_classifier,
    zero_shot_predictions,
    zeroshot_correctness,
    zeroshot_report,
)
from hnclip.io import atomic_path, write_json
from hnclip.loader import default_loader_workers
from hnclip.models import default_device, load_clip
from hnclip.provenance import provenance

log = logging.getLogger(__name__)

Paths = Mapping[str, str | os.PathLike]
ZEROSHOT_READERS = {"folder": read_image_folder, "cifar10": read_cifar10, "cifar100": read_cifar100}


def _read_references(references: Paths) -> dict[str, pd.DataFrame]:
    """Per-item results of the models this one is compared with (baseline, alpha = 0 control)."""
    return {name: pd.read_parquet(path) for name, path in references.items()}


def _write_items(items: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        items.to_parquet(tmp, index=False)


def _write_result(path, *, model: str, benchmark: str, rows: list[dict], inputs: Sequence, config: dict | None, **extra):
    write_json(
        path,
        {
            "model": model,
            "benchmark": benchmark,
            "rows": rows,
            "provenance": provenance(config, inputs=inputs, checksum_inputs=True, **extra),
        },
    )
    log.info("wrote %d rows to %s", len(rows), path)


def evaluate_encoder(
    *, model: str, model_name: str, weights, baseline_weights, test_shards: Sequence, zeroshot_root,
    zeroshot_format: str, references: Mapping[str, Paths], outputs: Paths, drift_images: int,
    batch_size: int, n_boot: int, seed: int, config: dict | None = None, compositional: Paths | None = None,
) -> None:
    """All encoder benchmarks of one model in one job: the model is loaded once.

    ``references`` maps a benchmark (hnc, zeroshot, and each compositionality benchmark) to {comparison name:
    per-item Parquet}; ``outputs`` holds hnc, hnc_items, zeroshot, zeroshot_items and drift paths, and
    ``<benchmark>`` / ``<benchmark>_items`` for each benchmark of ``compositional`` ({benchmark: item table}).
    """
    device = default_device()
    clip, preprocess, tokenizer = load_clip(model_name, weights, device=device)
    # images are read and preprocessed ahead of the model by the job's spare threads
    common = dict(model=model, batch_size=batch_size, n_boot=n_boot, seed=seed, config=config,
                  num_workers=default_loader_workers(torch.device(device)))
    evaluate_hnc(clip, preprocess, tokenizer, shards=test_shards, references=references["hnc"],
                 out_json=outputs["hnc"], out_items=outputs["hnc_items"], inputs=[weights], **common)
    evaluate_zeroshot(clip, preprocess, tokenizer, dataset_root=zeroshot_root, dataset_format=zeroshot_format,
                      references=references["zeroshot"], out_json=outputs["zeroshot"],
                      out_items=outputs["zeroshot_items"], inputs=[weights], **common)
    for benchmark, items_path in (compositional or {}).items():
        evaluate_compositional(clip, preprocess, tokenizer, benchmark=benchmark, items_path=items_path,
                               references=references[benchmark], out_json=outputs[benchmark],
                               out_items=outputs[f"{benchmark}_items"], inputs=[weights], **common)
    baseline = clip if model == "baseline" else load_clip(model_name, baseline_weights, device=device)[0]
    evaluate_drift(clip, baseline, preprocess, shards=test_shards, n_images=drift_images, out_json=outputs["drift"],
                   inputs=[weights, baseline_weights], **common)


def evaluate_compositional(
    clip, preprocess, tokenizer, *, model: str, benchmark: str, items_path, references: Paths, out_json, out_items,
    inputs: Sequence, batch_size: int, n_boot: int, seed: int, config: dict | None = None, num_workers: int = 0,
) -> None:
    """SugarCrepe, ARO or Winoground: accuracies with intervals and paired tests, whole and without HNC's images."""
    rows, items = evaluate_benchmark(clip, preprocess, tokenizer, benchmark, items_path, model=model,
                                     references=references, batch_size=batch_size, n_boot=n_boot, seed=seed,
                                     num_workers=num_workers)
    _write_items(items, out_items)
    _write_result(out_json, model=model, benchmark=benchmark, rows=rows, config=config,
                  inputs=[*inputs, items_path, *references.values()], seed=seed)


def evaluate_hnc(
    clip, preprocess, tokenizer, *, model: str, shards: Sequence, references: Paths, out_json, out_items,
    inputs: Sequence, batch_size: int, n_boot: int, seed: int, config: dict | None = None, num_workers: int = 0,
) -> None:
    """HNC pairwise accuracy (overall, per type group and type) with clustered CIs and McNemar comparisons."""
    pairs = read_pair_shards(shards)
    scored = pairwise_scores(clip, tokenizer, preprocess, pairs, batch_size=batch_size, num_workers=num_workers)
    items = pairwise_correctness(scored)
    rows = pairwise_accuracy_report(
        items, model=model, reference=_read_references(references), n_boot=n_boot, seed=seed
    )
    _write_items(items, out_items)
    _write_result(out_json, model=model, benchmark="hnc_test", rows=rows, config=config,
                  inputs=[*inputs, *shards, *references.values()], seed=seed)


def evaluate_zeroshot(
    clip, preprocess, tokenizer, *, model: str, dataset_root, dataset_format: str, references: Paths, out_json,
    out_items, inputs: Sequence, batch_size: int, n_boot: int, seed: int, config: dict | None = None,
    num_workers: int = 0,
) -> None:
    """Zero-shot top-1 with a prompt ensemble: is object recognition kept?"""
    dataset = ZEROSHOT_READERS[dataset_format](dataset_root)
    classifier = zero_shot_classifier(clip, tokenizer, dataset.classnames)
    predictions = zero_shot_predictions(clip, preprocess, dataset.images, classifier, batch_size=batch_size,
                                        num_workers=num_workers)
    items = zeroshot_correctness(dataset, predictions)
    rows = zeroshot_report(
        items, dataset.classnames, model=model, dataset=dataset_format,
        reference=_read_references(references), n_boot=n_boot, seed=seed,
    )
    _write_items(items, out_items)
    _write_result(out_json, model=model, benchmark="zeroshot", rows=rows, config=config,
                  inputs=[*inputs, *references.values()], seed=seed, dataset=str(dataset_root))


def evaluate_drift(
    clip, baseline, preprocess, *, model: str, shards: Sequence, n_images: int, out_json, inputs: Sequence,
    batch_size: int, n_boot: int, seed: int, config: dict | None = None, num_workers: int = 0,
) -> None:
    """Penultimate patch features (what LLaVA reads) of the model vs the baseline on a fixed image sample."""
    image_paths = sorted(set(read_pair_shards(shards)["image_path"]))
    sample = fixed_image_sample(image_paths, n_images, seed=seed)
    measurement = measure_drift(clip, baseline, preprocess, sample, batch_size=batch_size, num_workers=num_workers)
    rows = drift_report(measurement, model=model, n_boot=n_boot, seed=seed)
    _write_result(out_json, model=model, benchmark="drift", rows=rows, config=config,
                  inputs=inputs, seed=seed, images=len(sample))

