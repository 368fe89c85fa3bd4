"""The field's compositionality benchmarks for one encoder: SugarCrepe, ARO and Winoground.

Item tables (``hnclip.data.compositional``, prepared once per run with the leakage flag) hold one test item a row:
an image (cropped to ``bbox`` where ARO gives one), the true caption and one or more false ones. An item is
correct when s(image, true) > s(image, every false caption), strictly: a tie is a failure, as for HNC. Winoground
items are two images and two captions, scored by the paper's text, image and group scores.

Every accuracy comes with a cluster-bootstrap interval (clusters = images) and exact McNemar tests against the
baseline and the alpha = 0 control on the same items, like the HNC evaluation; each subset is also scored on the
items whose image is not among HNC's training images (``<subset>@no_hnc_overlap``). ARO's VG-Relation and
VG-Attribution are reported as ARO reports them, the macro average over relations / attribute pairs
(``macro_accuracy``; no interval), beside the micro accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from hnclip.data.compositional import SUGARCREPE_AGGREGATES, aro_macro_accuracy, subset_part, winoground_scores
from hnclip.data.leakage import CLEAN_SUFFIX
from hnclip.evaluate.encode import Preprocess, encode_images, encode_texts
from hnclip.evaluate.stats import accuracy_rows, align_reference
from hnclip.loader import CroppedImage

log = logging.getLogger(__name__)

ITEM_KEY = ("item_id",)
OVERLAP_COLUMN = "hnc_train_overlap"
# ARO's four parts, the prefix of an ARO item's subset ("vg_relation:on", "coco_order", ...).
ARO_PARTS = ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order")
WINOGROUND_METRICS = ("text_score", "image_score", "group_score")


def _image_sources(items: pd.DataFrame) -> tuple[list, np.ndarray]:
    """The distinct (image, crop) sources of the items, and each item's row among them."""
    keys = [(path, None if bbox is None else tuple(float(v) for v in bbox))
            for path, bbox in zip(items["image_path"], items["bbox"])]
    distinct = list(dict.fromkeys(keys))
    index = {key: k for k, key in enumerate(distinct)}
    sources = [path if box is None else CroppedImage(path, box) for path, box in distinct]
    return sources, np.array([index[key] for key in keys], dtype=np.int64)


def caption_scores(
    model: torch.nn.Module, tokenizer: Callable, preprocess: Preprocess, items: pd.DataFrame, *,
    batch_size: int = 64, num_workers: int = 0, progress: bool = True,
) -> pd.DataFrame:
    """Per item: ``score_true`` = s(image, positive) and ``score_false_max`` = the highest s(image, negative).

    Each distinct image crop and each distinct caption is encoded once."""
    sources, image_rows = _image_sources(items)
    image_features = encode_images(model, sources, preprocess, batch_size=batch_size, num_workers=num_workers,
                                   progress=progress)
    negatives = [list(n) for n in items["negatives"]]
    captions = pd.unique(pd.Series([*items["positive"], *(c for n in negatives for c in n)], dtype=object))
    caption_features = encode_texts(model, tokenizer, [str(c) for c in captions], batch_size=4 * batch_size,
                                    progress=progress)
    caption_index = pd.Index(captions)
    image_rows = torch.from_numpy(image_rows)
    true = (image_features[image_rows] * caption_features[caption_index.get_indexer(items["positive"])]).sum(dim=1)
    # every item's negatives in one product, then the highest per item (no Python loop over ~10^5 ARO items)
    owner = torch.from_numpy(np.repeat(np.arange(len(negatives)), [len(n) for n in negatives]))
    negative_rows = torch.from_numpy(caption_index.get_indexer([c for n in negatives for c in n]))
    false_scores = (image_features[image_rows[owner]] * caption_features[negative_rows]).sum(dim=1)
    false_max = torch.full((len(negatives),), -torch.inf, dtype=false_scores.dtype).scatter_reduce(
        0, owner, false_scores, "amax")
    scored = items[["item_id", "benchmark", "subset", "image_path", OVERLAP_COLUMN]].copy()
    scored["score_true"] = true.numpy().astype(np.float64)
    scored["score_false_max"] = false_max.numpy().astype(np.float64)
    scored["correct"] = scored["score_true"] > scored["score_false_max"]
    return scored


def sugarcrepe_subsets(items: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """All items, the three sample-weighted aggregates (items pooled), then each category."""
    subsets = [("all", np.ones(len(items), dtype=bool))]
    subsets += [(name, items["subset"].isin(categories).to_numpy()) for name, categories in SUGARCREPE_AGGREGATES.items()]
    subsets += [(category, (items["subset"] == category).to_numpy()) for category in sorted(items["subset"].unique())]
    return subsets


def aro_subsets(items: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """Each of ARO's parts (micro accuracy over its items)."""
    parts = items["subset"].map(subset_part)
    return [(part, (parts == part).to_numpy()) for part in ARO_PARTS if (parts == part).any()]


def with_clean_subsets(subsets: Sequence[tuple[str, np.ndarray]], overlap: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Each subset, then the same subset without the items whose image HNC trained on."""
    return [*subsets, *((f"{name}{CLEAN_SUFFIX}", mask & ~overlap) for name, mask in subsets)]


def _aro_macro(correct: np.ndarray, subsets: Sequence[str]) -> dict[str, float]:
    """ARO's macro accuracy of each part that has a group left to average (ARO drops symmetric relations and
    attribute pairs with fewer than 25 items)."""
    parts = np.array([subset_part(s) for s in subsets], dtype=object)
    macros = {}
    for part in ("vg_relation", "vg_attribution"):
        mask = parts == part
        if not mask.any():
            continue
        try:
            macros.update(aro_macro_accuracy(np.asarray(correct)[mask], [s for s, m in zip(subsets, mask) if m]))
        except ValueError as reason:
            log.warning("ARO macro accuracy of %s not defined on these items: %s", part, reason)
    return macros


def macro_rows(scored: pd.DataFrame, *, model: str, references: Mapping[str, pd.DataFrame]) -> list[dict]:
    """ARO's macro accuracies, on all items and without HNC's training images (and their differences to the
    references' on the same items; no interval or test: ARO reports none)."""
    rows = []
    for clean in (False, True):
        items = scored[~scored[OVERLAP_COLUMN]] if clean else scored
        values = _aro_macro(items["correct"].to_numpy(), list(items["subset"]))
        reference_values = {name: _aro_macro(align_reference(items, frame, ITEM_KEY, name), list(items["subset"]))
                            for name, frame in references.items()}
        for part, value in values.items():
            part_items = items["subset"].map(subset_part) == part
            row = dict(model=model, benchmark="aro", subset=part + (CLEAN_SUFFIX if clean else ""),
                       metric="macro_accuracy", value=value, ci_low=None, ci_high=None, n=int(part_items.sum()))
            for name, reference in reference_values.items():
                if part in reference:
                    row[f"delta_vs_{name}"] = value - reference[part]
            rows.append(row)
    return rows


def caption_benchmark_rows(
    scored: pd.DataFrame, *, model: str, benchmark: str, references: Mapping[str, pd.DataFrame], n_boot: int,
    seed: int,
) -> list[dict]:
    """Results-table rows of a SugarCrepe or ARO item table scored by :func:`caption_scores`."""
    subsets = sugarcrepe_subsets(scored) if benchmark == "sugarcrepe" else aro_subsets(scored)
    aligned = {name: align_reference(scored, frame, ITEM_KEY, name) for name, frame in references.items()}
    rows = accuracy_rows(
        scored["correct"].to_numpy(), scored["image_path"].astype(str).to_numpy(),
        with_clean_subsets(subsets, scored[OVERLAP_COLUMN].to_numpy(dtype=bool)),
        base={"model": model, "benchmark": benchmark}, metric="accuracy", references=aligned, n_boot=n_boot,
        seed=seed,
    )
    return rows + (macro_rows(scored, model=model, references=references) if benchmark == "aro" else [])


def winoground_item_scores(
    model: torch.nn.Module, tokenizer: Callable, preprocess: Preprocess, items: pd.DataFrame, *,
    batch_size: int = 64, num_workers: int = 0, progress: bool = True,
) -> pd.DataFrame:
    """Per Winoground item: its id, tag and the three scores."""
    images = encode_images(model, [*items["image_0"], *items["image_1"]], preprocess, batch_size=batch_size,
                           num_workers=num_workers, progress=progress)
    texts = encode_texts(model, tokenizer, [*items["caption_0"], *items["caption_1"]], progress=progress)
    n = len(items)
    captions = torch.stack([texts[:n], texts[n:]], dim=1)  # item, caption, dim
    pictures = torch.stack([images[:n], images[n:]], dim=1)  # item, image, dim
    similarities = torch.einsum("ncd,nid->nci", captions, pictures).numpy()
    scored = pd.DataFrame(winoground_scores(similarities))
    scored.insert(0, "item_id", items["item_id"].astype(str).to_numpy())
    scored.insert(1, "collapsed_tag", items["collapsed_tag"].astype(str).to_numpy())
    return scored


def winoground_rows(scored: pd.DataFrame, *, model: str, references: Mapping[str, pd.DataFrame], n_boot: int,
                    seed: int) -> list[dict]:
    """Text, image and group score over all items and per collapsed tag, with intervals and McNemar tests."""
    subsets = [("all", np.ones(len(scored), dtype=bool))]
    subsets += [(f"tag:{tag}", (scored["collapsed_tag"] == tag).to_numpy()) for tag in sorted(scored["collapsed_tag"].unique())]
    rows = []
    for metric in WINOGROUND_METRICS:
        aligned = {name: align_reference(scored, frame, ITEM_KEY, name, value_column=metric)
                   for name, frame in references.items()}
        rows += accuracy_rows(scored[metric].to_numpy(), None, subsets, base={"model": model, "benchmark": "winoground"},
                              metric=metric, references=aligned, n_boot=n_boot, seed=seed)
    return rows


# ---- the stage: item tables once per run, then every model ---------------------------------------------------
WINOGROUND_NOTE = "Winoground's images are its own (licensed from Getty Images): none can be an HNC training image."


def read_benchmark_items(benchmark: str, paths: Mapping[str, str], *, order_seed: int,
                         on_missing_image: str = "error") -> pd.DataFrame:
    """A benchmark's items from its raw files, in the published formats (``hnclip.data.compositional``)."""
    from hnclip.data import compositional as formats

    if benchmark == "sugarcrepe":
        return formats.read_sugarcrepe(paths["sugarcrepe"], paths["coco_val2017_images"],
                                       on_missing_image=on_missing_image)
    if benchmark == "aro":
        parts = [
            formats.read_vg_relation(paths["aro_vg_relation"], paths["aro_vg_images"], on_missing_image=on_missing_image),
            formats.read_vg_attribution(paths["aro_vg_attribution"], paths["aro_vg_images"],
                                        on_missing_image=on_missing_image),
            formats.read_order_captions(paths["coco_karpathy_test"], paths["coco_images"], benchmark_subset="coco_order",
                                        seed=order_seed, collection="coco", on_missing_image=on_missing_image),
            formats.read_order_captions(paths["flickr30k_karpathy_test"], paths["flickr30k_images"],
                                        benchmark_subset="flickr30k_order", seed=order_seed, collection="flickr30k",
                                        on_missing_image=on_missing_image),
        ]
        return pd.concat(parts, ignore_index=True)
    if benchmark == "winoground":
        root = Path(paths["winoground"])
        items = formats.read_winoground(root / "examples.jsonl", root / "images", on_missing_image=on_missing_image)
        return items.assign(item_id=items["item_id"].astype(str))
    raise ValueError(f"unknown compositionality benchmark {benchmark!r}")


def prepare_items(benchmark: str, paths: Mapping[str, str], *, train_shards: Sequence, out_items, out_leakage,
                  order_seed: int, on_missing_image: str = "error", config: dict | None = None) -> dict:
    """Write a benchmark's item table with the leakage flag, and its leakage report; returns the report."""
    from hnclip.data.compositional import ORDER_PERTURBATIONS_SOURCE, read_vg_image_data
    from hnclip.data.leakage import hnc_training_vg_ids, leakage_report, overlap_routes
    from hnclip.io import atomic_path, write_json
    from hnclip.provenance import provenance

    items = read_benchmark_items(benchmark, paths, order_seed=order_seed, on_missing_image=on_missing_image)
    if benchmark == "winoground":
        items[OVERLAP_COLUMN] = False
        report = {"benchmark": benchmark, "items": len(items), "overlapping_items": 0,
                  "by_part": {"all": {"items": len(items), "overlapping": 0}}, "note": WINOGROUND_NOTE}
    else:
        routes = overlap_routes(items, read_vg_image_data(paths["vg_image_data"]), hnc_training_vg_ids(train_shards))
        items[OVERLAP_COLUMN] = routes["any"].to_numpy()
        note = f"COCO-Order / Flickr30k-Order perturbations: {ORDER_PERTURBATIONS_SOURCE}" if benchmark == "aro" else ""
        report = leakage_report(benchmark, items, routes, note=note)
    with atomic_path(out_items) as tmp:
        items.to_parquet(tmp, index=False)
    report["dropped"] = {k: int(v) for k, v in items.attrs.get("dropped", {}).items()}
    write_json(out_leakage, {**report, "provenance": provenance(config, inputs=list(paths.values()), seed=order_seed)})
    log.info("%s: %d items, %d with an HNC training image", benchmark, len(items), report["overlapping_items"])
    return report


def evaluate_benchmark(
    clip, preprocess, tokenizer, benchmark: str, items_path, *, model: str, references: Mapping[str, str],
    batch_size: int, n_boot: int, seed: int, num_workers: int = 0,
) -> tuple[list[dict], pd.DataFrame]:
    """One model on one benchmark: results-table rows and the per-item results later models are compared with."""
    items = pd.read_parquet(items_path)
    reference_items = {name: pd.read_parquet(path) for name, path in references.items()}
    common = dict(batch_size=batch_size, num_workers=num_workers)
    if benchmark == "winoground":
        scored = winoground_item_scores(clip, tokenizer, preprocess, items, **common)
        return winoground_rows(scored, model=model, references=reference_items, n_boot=n_boot, seed=seed), scored
    scored = caption_scores(clip, tokenizer, preprocess, items, **common)
    rows = caption_benchmark_rows(scored, model=model, benchmark=benchmark, references=reference_items,
                                  n_boot=n_boot, seed=seed)
    return rows, scored
