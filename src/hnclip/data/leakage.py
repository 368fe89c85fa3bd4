"""Which benchmark images HNC trained on.

HNC's training captions describe GQA images, and GQA's train/val images are Visual Genome images under their VG
ids. VG-Relation and VG-Attribution are VG images too; many VG images are also COCO or Flickr30k images, which VG's
``image_data.json`` names (``coco_id``, ``flickr_id``). So a benchmark item overlaps HNC's training images when its
VG id is one of them, or its COCO / Flickr30k id is that of one of them. Every benchmark is scored on the whole and
on the items that do not overlap.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import pandas as pd

ROUTES = ("vg_id", "coco_id", "flickr_id")
# The subsets scored without the items whose image HNC trained on: "<subset>@no_hnc_overlap".
CLEAN_SUFFIX = "@no_hnc_overlap"


def hnc_training_vg_ids(train_shards: Sequence[str | os.PathLike]) -> set[int]:
    """The VG ids of the images HNC's training pairs describe (GQA train/val image ids are VG ids). One shard at a
    time: the train split's 8.2 M pairs name only 67,807 images."""
    from hnclip.data.hnc import read_pair_tables

    ids: set[int] = set()
    for shard in train_shards:
        image_ids = read_pair_tables([shard], columns=["image_id"])["image_id"]
        ids.update(int(i) for i in pd.unique(image_ids) if str(i).isdigit())
    return ids


def _ids_of_training_images(vg_images: pd.DataFrame, training_vg_ids: set[int], column: str) -> set[int]:
    """The COCO or Flickr30k ids of the VG images HNC trained on."""
    trained = vg_images[vg_images["vg_id"].isin(training_vg_ids)]
    return {int(v) for v in trained[column].dropna()}


def overlap_routes(items: pd.DataFrame, vg_images: pd.DataFrame, training_vg_ids: set[int]) -> pd.DataFrame:
    """Per item, by which id (VG, COCO through VG's coco_id, Flickr30k through flickr_id) its image is an HNC
    training image; the column ``any`` is the flag the scores use."""
    known = {"vg_id": training_vg_ids,
             "coco_id": _ids_of_training_images(vg_images, training_vg_ids, "coco_id"),
             "flickr_id": _ids_of_training_images(vg_images, training_vg_ids, "flickr_id")}
    routes = pd.DataFrame({route: items[route].isin(known[route]).fillna(False).astype(bool).to_numpy()
                           for route in ROUTES}, index=items.index)
    routes["any"] = routes[list(ROUTES)].any(axis=1)
    return routes


def leakage_report(benchmark: str, items: pd.DataFrame, routes: pd.DataFrame, *, note: str = "") -> dict:
    """Counts for the leakage table: items and images overall, overlapping ones by route and per subset part."""
    from hnclip.data.compositional import subset_part

    parts = items["subset"].astype(str).map(subset_part)
    report = {
        "benchmark": benchmark,
        "items": len(items),
        "overlapping_items": int(routes["any"].sum()),
        "images": int(items["image_path"].nunique()),
        "overlapping_images": int(items.loc[routes["any"].to_numpy(), "image_path"].nunique()),
        "by_route": {route: int(routes[route].sum()) for route in ROUTES},
        "by_part": {part: {"items": int((parts == part).sum()), "overlapping": int(routes["any"][parts == part].sum())}
                    for part in sorted(parts.unique())},
    }
    if note:
        report["note"] = note
    return report


def leakage_table(reports: Iterable[dict]) -> pd.DataFrame:
    """One row per benchmark part: items, overlapping items and their share."""
    rows = []
    for report in reports:
        for part, counts in report["by_part"].items():
            share = counts["overlapping"] / counts["items"] if counts["items"] else 0.0
            rows.append({"benchmark": report["benchmark"], "part": part, "items": counts["items"],
                         "overlapping_items": counts["overlapping"], "overlap_share": round(share, 4),
                         "note": report.get("note", "")})
    return pd.DataFrame(rows, columns=["benchmark", "part", "items", "overlapping_items", "overlap_share", "note"])
