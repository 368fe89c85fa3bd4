"""The compositionality benchmarks' scoring: subsets and aggregates, ARO's macro accuracy, Winoground's scores,
the leakage flags and report on constructed overlaps, the skip of a gated benchmark without a token, and crops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hnclip.data.leakage import leakage_report, leakage_table, overlap_routes
from hnclip.evaluate.compositional import (
    CLEAN_SUFFIX,
    OVERLAP_COLUMN,
    caption_benchmark_rows,
    winoground_rows,
)
from hnclip.loader import CroppedImage, load_image
from hnclip.pipeline.config import compositional_benchmarks


def scored_items(subsets: list[str], correct: list[bool], overlap: list[bool] | None = None) -> pd.DataFrame:
    n = len(subsets)
    return pd.DataFrame({
        "item_id": [f"i{k}" for k in range(n)], "benchmark": "x", "subset": subsets,
        "image_path": [f"img{k}.jpg" for k in range(n)], OVERLAP_COLUMN: overlap or [False] * n,
        "score_true": 0.0, "score_false_max": 0.0, "correct": correct,
    })


def rows_by(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["subset"], r["metric"]): r for r in rows}


def test_sugarcrepe_aggregates_pool_their_categories_and_clean_subsets_drop_the_overlap():
    subsets = ["replace_obj"] * 4 + ["replace_rel"] * 2 + ["swap_att"] * 2 + ["add_obj"] * 2
    correct = [True, True, True, False, False, False, True, False, True, True]
    overlap = [True, False, False, False, False, False, False, False, False, False]
    rows = rows_by(caption_benchmark_rows(scored_items(subsets, correct, overlap), model="m", benchmark="sugarcrepe",
                                          references={}, n_boot=100, seed=0))
    assert rows["all", "accuracy"]["value"] == pytest.approx(6 / 10)
    assert rows["replace", "accuracy"]["value"] == pytest.approx(3 / 6)  # sample-weighted: 3 of the 6 replace items
    assert rows["swap", "accuracy"]["value"] == pytest.approx(1 / 2)
    assert rows["add", "accuracy"]["value"] == pytest.approx(1.0)
    assert rows["replace_obj", "accuracy"]["value"] == pytest.approx(3 / 4)
    assert rows["all" + CLEAN_SUFFIX, "accuracy"]["value"] == pytest.approx(5 / 9)
    assert rows["replace_obj" + CLEAN_SUFFIX, "accuracy"]["n"] == 3


def test_paired_tests_against_a_reference_on_the_same_items():
    subsets = ["replace_obj"] * 6
    model = scored_items(subsets, [True] * 6)
    reference = scored_items(subsets, [False] * 6).iloc[::-1]  # another order: joined on item_id
    rows = rows_by(caption_benchmark_rows(model, model="m", benchmark="sugarcrepe",
                                          references={"baseline": reference}, n_boot=100, seed=0))
    assert rows["all", "accuracy"]["delta_vs_baseline"] == pytest.approx(1.0)
    assert rows["all", "accuracy"]["p_vs_baseline"] == pytest.approx(2 * 0.5 ** 6)  # exact McNemar, 6 discordant


def test_aro_micro_per_part_and_macro_over_relations_as_aro_reports_them():
    # "on": 3 of 4 right, "left of": 0 of 1; "near" is one of the relations ARO leaves out of its macro average
    subsets = ["vg_relation:on"] * 4 + ["vg_relation:left of"] + ["vg_relation:near"] * 2 + ["coco_order"] * 2
    correct = [True, True, True, False, False, True, True, True, False]
    rows = rows_by(caption_benchmark_rows(scored_items(subsets, correct), model="m", benchmark="aro",
                                          references={}, n_boot=100, seed=0))
    assert rows["vg_relation", "accuracy"]["value"] == pytest.approx(5 / 7)  # micro: every item
    assert rows["vg_relation", "macro_accuracy"]["value"] == pytest.approx((3 / 4 + 0) / 2)
    assert rows["coco_order", "accuracy"]["value"] == pytest.approx(1 / 2)
    assert ("vg_attribution", "macro_accuracy") not in rows  # no attribute pair has ARO's 25 items


def test_winoground_rows_per_metric_and_tag():
    scored = pd.DataFrame({"item_id": ["0", "1", "2", "3"], "collapsed_tag": ["Object", "Object", "Relation", "Relation"],
                           "text_score": [True, True, False, True], "image_score": [True, False, False, False],
                           "group_score": [True, False, False, False]})
    rows = rows_by(winoground_rows(scored, model="m", references={}, n_boot=100, seed=0))
    assert rows["all", "text_score"]["value"] == pytest.approx(0.75)
    assert rows["all", "group_score"]["value"] == pytest.approx(0.25)
    assert rows["tag:Relation", "text_score"]["value"] == pytest.approx(0.5)


def test_leakage_flags_items_by_vg_id_and_through_vg_coco_and_flickr_ids():
    vg_images = pd.DataFrame({"vg_id": pd.array([1, 2, 3, 4], dtype="Int64"),
                              "coco_id": pd.array([100, None, 300, 400], dtype="Int64"),
                              "flickr_id": pd.array([None, 20, None, None], dtype="Int64")})
    training = {1, 2}  # HNC trained on VG images 1 (COCO 100) and 2 (Flickr 20)
    items = pd.DataFrame({
        "subset": ["vg_relation:on", "vg_relation:on", "coco_order", "coco_order", "flickr30k_order", "replace_obj"],
        "image_path": ["1.jpg", "3.jpg", "c100.jpg", "c300.jpg", "f20.jpg", "c400.jpg"],
        "vg_id": pd.array([1, 3, None, None, None, None], dtype="Int64"),
        "coco_id": pd.array([None, None, 100, 300, None, 400], dtype="Int64"),
        "flickr_id": pd.array([None, None, None, None, 20, None], dtype="Int64"),
    })
    routes = overlap_routes(items, vg_images, training)
    assert routes["any"].tolist() == [True, False, True, False, True, False]
    report = leakage_report("aro", items, routes)
    assert report["overlapping_items"] == 3 and report["by_route"] == {"vg_id": 1, "coco_id": 1, "flickr_id": 1}
    assert report["by_part"]["coco_order"] == {"items": 2, "overlapping": 1}
    table = leakage_table([report])
    assert table.set_index("part").loc["vg_relation", "overlap_share"] == pytest.approx(0.5)


def real_run(**paths) -> dict:
    return {"data_source": "download", "evaluate": {"compositional": ["sugarcrepe", "aro", "winoground"]},
            "paths": {"winoground": None, **paths}}


def test_a_gated_benchmark_without_a_token_is_skipped_with_how_to_enable_it():
    kept, messages = compositional_benchmarks(real_run(), token="")
    assert kept == ["sugarcrepe", "aro"]
    assert len(messages) == 1 and "facebook/winoground is gated" in messages[0] and "HF_TOKEN" in messages[0]
    assert compositional_benchmarks(real_run(), token="hf_x") == (["sugarcrepe", "aro", "winoground"], [])
    assert compositional_benchmarks(real_run(winoground="/data/winoground"), token="")[1] == []
    demo = {**real_run(), "data_source": "synth"}
    assert compositional_benchmarks(demo, token="") == (["sugarcrepe", "aro", "winoground"], [])


def test_a_crop_is_read_lazily_and_equals_the_box_of_the_image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    crop = load_image(CroppedImage(str(tmp_path / "a.png"), (10.0, 5.0, 20.0, 30.0)))
    assert crop.size == (20, 30)
    assert np.array_equal(np.asarray(crop), pixels[5:35, 10:30])
