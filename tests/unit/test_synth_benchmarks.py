"""The synthetic world's compositionality benchmarks: published formats, caption truth, determinism, planted leakage."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from hnclip.synth import WorldConfig, caption_is_true, write_world
from hnclip.synth.benchmarks import (
    BENCHMARKS,
    LEAK_COCO_ORDER,
    LEAK_FLICKR_ORDER,
    LEAK_SUGARCREPE_PER_CATEGORY,
    LEAK_VG_ATTRIBUTION,
    LEAK_VG_RELATION,
    ORDER_CAPTIONS_PER_IMAGE,
    ORDER_IMAGES,
    SUGARCREPE_CATEGORIES,
    SUGARCREPE_PER_CATEGORY,
    VG_ATTRIBUTION_ITEMS,
    VG_RELATION_ITEMS,
    WINOGROUND_ITEMS,
    BenchmarkCaption,
    benchmark_caption_is_true,
    parse_benchmark_caption,
    plan_compositional_benchmarks,
    write_compositional_benchmarks,
)
from hnclip.synth.language import Desc
from hnclip.synth.vocabulary import COLOUR_RGB, COLOURS, RELATIONS, SIZES
from hnclip.synth.world import SceneSampler, choose_heldout

# A world with just enough GQA training images to plant every overlap; the other splits are token-sized.
CONFIG = WorldConfig(
    seed=11,
    n_train=160,
    n_val=2,
    n_test=2,
    n_vqa_train=3,
    n_vqa_val=3,
    n_textvqa_train=2,
    n_textvqa_val=2,
    zeroshot_per_class=1,
)
BENCHMARK_DIRS = ("sugarcrepe", "aro", "winoground", "vg")
EXPECTED_PLANTED = {
    "sugarcrepe": LEAK_SUGARCREPE_PER_CATEGORY * len(SUGARCREPE_CATEGORIES),
    "vg_relation": LEAK_VG_RELATION,
    "vg_attribution": LEAK_VG_ATTRIBUTION,
    "coco_order": LEAK_COCO_ORDER,
    "flickr30k_order": LEAK_FLICKR_ORDER,
    "winoground": 0,
}


def sampler_for(config: WorldConfig) -> SceneSampler:
    return SceneSampler(config, choose_heldout(config))


def train_ids(world_root: Path) -> list[str]:
    return list(json.loads((world_root / "hnc" / "hnc_clean_strict_train.json").read_text()))


def fresh_root(world_root: Path, target: Path) -> Path:
    """A root holding only the world's GQA folder: the benchmarks read the HNC training images from there."""
    target.mkdir(parents=True)
    shutil.copytree(world_root / "gqa", target / "gqa")
    return target


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, CONFIG)
    return root


@pytest.fixture(scope="module")
def bench(world, tmp_path_factory) -> tuple[Path, dict, float]:
    root = fresh_root(world, tmp_path_factory.mktemp("bench") / "root")
    start = time.perf_counter()
    counts = write_compositional_benchmarks(root, CONFIG, sampler_for(CONFIG), train_ids(world))
    return root, counts, time.perf_counter() - start


@pytest.fixture(scope="module")
def plan(world):
    return plan_compositional_benchmarks(world, CONFIG, sampler_for(CONFIG), train_ids(world))


def load(root: Path, relative: str):
    return json.loads((root / relative).read_text(encoding="utf-8"))


def winoground_lines(root: Path) -> list[dict]:
    text = (root / "winoground/data/examples.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for top in BENCHMARK_DIRS
        for p in sorted((root / top).rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------ files and formats


def test_sugarcrepe_files_have_the_published_format(bench):
    root, _, _ = bench
    for category in SUGARCREPE_CATEGORIES:
        path = root / "sugarcrepe" / f"{category}.json"
        text = path.read_text(encoding="utf-8")
        assert text.startswith('{\n    "0": {\n        "filename": "'), "indent=4, as the released files"
        assert not text.endswith("\n")
        data = json.loads(text)
        assert isinstance(data, dict) and list(data) == [str(k) for k in range(SUGARCREPE_PER_CATEGORY)]
        for record in data.values():
            assert list(record) == ["filename", "caption", "negative_caption"]
            assert re.fullmatch(r"\d{12}\.jpg", record["filename"])
            assert all(isinstance(record[k], str) and record[k] for k in record)
            image = Image.open(root / "sugarcrepe" / "val2017" / record["filename"])
            assert image.format == "JPEG" and image.size == (CONFIG.image_size,) * 2


@pytest.mark.parametrize(
    ("filename", "extra", "count"),
    [
        ("visual_genome_relation.json", "relation_name", VG_RELATION_ITEMS),
        ("visual_genome_attribution.json", "attributes", VG_ATTRIBUTION_ITEMS),
    ],
)
def test_aro_vg_files_have_aro_fields(bench, filename, extra, count):
    root, _, _ = bench
    records = load(root, f"aro/{filename}")
    assert isinstance(records, list) and len(records) == count
    ids = set()
    for record in records:
        assert set(record) == {
            "image_id",
            extra,
            "obj1_name",
            "obj2_name",
            "image_path",
            "bbox_x",
            "bbox_y",
            "bbox_w",
            "bbox_h",
            "true_caption",
            "false_caption",
        }
        assert re.fullmatch(r"\d+", record["image_id"]) and record["image_path"] == f"{record['image_id']}.jpg"
        ids.add(record["image_id"])
        image = Image.open(root / "aro" / "images" / record["image_path"])
        assert image.format == "JPEG"
        x, y, w, h = (record[f"bbox_{k}"] for k in "xywh")
        assert all(isinstance(v, int) for v in (x, y, w, h))
        assert w > 0 and h > 0 and x + w <= image.width and y + h <= image.height  # ARO crops to this box
        if extra == "relation_name":
            assert record["relation_name"] in RELATIONS
        else:
            assert isinstance(record["attributes"], list) and len(record["attributes"]) == 2
            assert all(a in COLOURS or a in SIZES for a in record["attributes"])
    assert len(ids) == count


@pytest.mark.parametrize(
    ("filename", "pattern"),
    [
        ("coco_karpathy_test.json", r"val2014/COCO_val2014_\d{12}\.jpg"),
        ("flickr30k_test.json", r"flickr30k-images/\d+\.jpg"),
    ],
)
def test_order_sets_have_blip_karpathy_test_format(bench, filename, pattern):
    root, _, _ = bench
    records = load(root, f"aro/{filename}")
    assert isinstance(records, list) and len(records) == ORDER_IMAGES
    for record in records:
        assert list(record) == ["image", "caption"]
        assert re.fullmatch(pattern, record["image"])
        assert len(record["caption"]) == ORDER_CAPTIONS_PER_IMAGE == len(set(record["caption"]))
        assert all(isinstance(c, str) and c.endswith(".") for c in record["caption"])
        assert Image.open(root / "aro" / record["image"]).size == (CONFIG.image_size,) * 2


def test_winoground_has_examples_jsonl_and_png_images(bench):
    root, _, _ = bench
    lines = winoground_lines(root)
    assert [r["id"] for r in lines] == list(range(WINOGROUND_ITEMS))
    for record in lines:
        assert list(record) == [
            "id",
            "image_0",
            "image_1",
            "caption_0",
            "caption_1",
            "tag",
            "secondary_tag",
            "num_main_preds",
            "collapsed_tag",
        ]
        k = record["id"]
        assert (record["image_0"], record["image_1"]) == (f"ex_{k}_img_0", f"ex_{k}_img_1")
        assert record["collapsed_tag"] in {"Object", "Relation", "Both"}
        assert record["secondary_tag"] == "" and record["num_main_preds"] == 1
        for name in (record["image_0"], record["image_1"]):
            image = Image.open(root / "winoground" / "data" / "images" / f"{name}.png")
            assert image.format == "PNG" and image.size == (CONFIG.image_size,) * 2
    assert {r["collapsed_tag"] for r in lines} == {"Object", "Relation"}


def test_vg_image_data_has_visual_genome_format(bench, world):
    root, _, _ = bench
    records = load(root, "vg/image_data.json")
    assert isinstance(records, list)
    for record in records:
        assert list(record) == ["width", "url", "height", "image_id", "coco_id", "flickr_id"]
        assert isinstance(record["image_id"], int)
        assert record["url"].endswith(f"/{record['image_id']}.jpg")
        assert record["width"] == record["height"] == CONFIG.image_size
        assert record["coco_id"] is None or isinstance(record["coco_id"], int)
        assert record["flickr_id"] is None or isinstance(record["flickr_id"], int)
    image_ids = [r["image_id"] for r in records]
    assert image_ids == sorted(set(image_ids))
    assert {int(i) for i in train_ids(world)} <= set(image_ids), "GQA ids are VG ids: every training image is listed"


def test_counts_describe_what_was_written(bench):
    root, counts, _ = bench
    assert counts["sugarcrepe"] == {**{c: SUGARCREPE_PER_CATEGORY for c in SUGARCREPE_CATEGORIES}, "images": 140}
    assert counts["vg_relation"] == {"items": VG_RELATION_ITEMS}
    assert counts["vg_attribution"] == {"items": VG_ATTRIBUTION_ITEMS}
    order = {"images": ORDER_IMAGES, "captions": ORDER_IMAGES * ORDER_CAPTIONS_PER_IMAGE}
    assert counts["coco_order"] == counts["flickr30k_order"] == order
    assert counts["winoground"]["examples"] == WINOGROUND_ITEMS and counts["winoground"]["images"] == 48
    assert counts["vg_image_data"]["images"] == len(load(root, "vg/image_data.json"))
    assert set(counts["leakage_planted"]) == set(BENCHMARKS)
    json.dumps(counts)  # world.json takes it as is


# ------------------------------------------------------------------ truth of the captions


def test_parser_reads_back_every_form():
    forms = [
        BenchmarkCaption((Desc("circle", "red"), Desc("square", "blue")), "to the left of"),
        BenchmarkCaption((Desc("circle", "red", "large"), Desc("square")), "below", copula=True),
        BenchmarkCaption((Desc("cross"),)),
        BenchmarkCaption((Desc("cross", "gray"), Desc("diamond", size="small"), Desc("triangle", "yellow"))),
        BenchmarkCaption((Desc("circle", "purple"), Desc("square", "green")), definite=True),
        BenchmarkCaption((Desc("circle"), Desc("square", "green")), "above", definite=True, copula=True),
    ]
    for caption in forms:
        assert parse_benchmark_caption(caption.sentence()) == caption
        assert parse_benchmark_caption(caption.body()) == caption


@pytest.mark.parametrize(
    "text",
    ["a red circle is", "red circle", "a circle and the square", "a circle next to a square", "a circle a square"],
)
def test_parser_rejects_other_sentences_naming_them(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_benchmark_caption(text)


def test_caption_semantics_on_a_hand_built_scene():
    entry = {
        "width": 64,
        "height": 64,
        "objects": {
            "0": {
                "name": "circle",
                "attributes": ["red", "small"],
                "relations": [{"name": "to the left of", "object": "1"}],
            },
            "1": {
                "name": "square",
                "attributes": ["blue", "large"],
                "relations": [{"name": "to the right of", "object": "0"}],
            },
            "2": {"name": "circle", "attributes": ["blue", "small"], "relations": []},
        },
    }
    for text, expected in [
        ("A red circle to the left of a blue square.", True),
        ("A blue square to the left of a red circle.", False),
        ("A red circle and a blue square.", True),
        ("A blue circle and a red square.", False),
        ("A circle and a circle.", True),  # two circles
        ("A square and a square.", False),
        ("A red circle, a blue square and a green cross.", False),
        ("the red circle and the blue square", True),
        ("the circle and the square", False),  # "the circle" does not pick one out
        ("the small circle is to the left of the square", False),  # two small circles
        ("the red circle is to the left of the square", True),
    ]:
        assert benchmark_caption_is_true(text, entry) is expected, text


def descs_of(text: str) -> list[Desc]:
    return list(parse_benchmark_caption(text).descs)


def check_sugarcrepe_edit(category: str, positive: BenchmarkCaption, negative: BenchmarkCaption) -> None:
    """The negative is the category's edit of the positive."""
    p, n = list(positive.descs), list(negative.descs)
    if category == "add_obj":
        assert n[: len(p)] == p and len(n) == len(p) + 1 and positive.relation is None
        return
    assert len(n) == len(p)
    changed = [i for i in range(len(p)) if p[i] != n[i]]
    if category == "replace_rel":
        assert p == n and positive.relation != negative.relation and negative.relation is not None
        return
    assert positive.relation == negative.relation
    if category == "replace_obj":
        assert len(changed) == 1 and p[changed[0]].noun != n[changed[0]].noun
        assert (p[changed[0]].colour, p[changed[0]].size) == (n[changed[0]].colour, n[changed[0]].size)
    elif category == "replace_att":
        assert len(changed) == 1 and p[changed[0]].noun == n[changed[0]].noun
    elif category == "swap_obj":
        assert n == p[::-1] and all(d.colour is None and d.size is None for d in p)
    elif category == "swap_att":
        assert [d.noun for d in n] == [d.noun for d in p] and [d.colour for d in n] == [d.colour for d in p][::-1]
    elif category == "add_att":
        assert len(changed) == 1
        before, after = p[changed[0]], n[changed[0]]
        assert before == Desc(before.noun) and after.noun == before.noun and (after.colour or after.size)
    else:
        raise AssertionError(category)


def test_sugarcrepe_positives_are_true_and_negatives_false_edits(bench, plan):
    root, _, _ = bench
    graphs = plan.scene_graphs
    for category in SUGARCREPE_CATEGORIES:
        for record in load(root, f"sugarcrepe/{category}.json").values():
            graph = graphs[f"sugarcrepe/val2017/{record['filename']}"]
            assert record["caption"] != record["negative_caption"]
            assert benchmark_caption_is_true(record["caption"], graph), (category, record)
            assert not benchmark_caption_is_true(record["negative_caption"], graph), (category, record)
            check_sugarcrepe_edit(
                category,
                parse_benchmark_caption(record["caption"]),
                parse_benchmark_caption(record["negative_caption"]),
            )


def test_vg_relation_captions_swap_subject_and_object(bench, plan):
    root, _, _ = bench
    for record in load(root, "aro/visual_genome_relation.json"):
        graph = plan.scene_graphs[f"aro/images/{record['image_path']}"]
        true, false = record["true_caption"], record["false_caption"]
        assert true == true.lower() and not true.endswith(".")
        # In the world's own caption grammar too ("the D is R the E").
        assert caption_is_true(true, graph) and not caption_is_true(false, graph)
        assert benchmark_caption_is_true(true, graph) and not benchmark_caption_is_true(false, graph)
        t, f = parse_benchmark_caption(true), parse_benchmark_caption(false)
        assert f.descs == t.descs[::-1] and t.relation == f.relation == record["relation_name"]
        assert [d.noun for d in t.descs] == [record["obj1_name"], record["obj2_name"]]
        crop = [o for o in graph["objects"].values()]
        x, y, w, h = (record[f"bbox_{k}"] for k in "xywh")
        inside = [
            o for o in crop if x <= o["x"] and y <= o["y"] and o["x"] + o["w"] <= x + w and o["y"] + o["h"] <= y + h
        ]
        assert {o["name"] for o in inside} >= {record["obj1_name"], record["obj2_name"]}


def test_vg_attribution_captions_swap_the_attributes(bench, plan):
    root, _, _ = bench
    kinds = Counter()
    for record in load(root, "aro/visual_genome_attribution.json"):
        graph = plan.scene_graphs[f"aro/images/{record['image_path']}"]
        true, false = record["true_caption"], record["false_caption"]
        assert benchmark_caption_is_true(true, graph) and not benchmark_caption_is_true(false, graph)
        a, b = record["attributes"]
        assert true == f"the {a} {record['obj1_name']} and the {b} {record['obj2_name']}"
        assert false == f"the {b} {record['obj1_name']} and the {a} {record['obj2_name']}"
        kinds["size" if a in SIZES else "colour"] += 1
    assert kinds["colour"] > kinds["size"]


def test_order_captions_are_all_true(bench, plan):
    root, _, _ = bench
    for filename in ("coco_karpathy_test.json", "flickr30k_test.json"):
        for record in load(root, f"aro/{filename}"):
            graph = plan.scene_graphs[f"aro/{record['image']}"]
            for caption in record["caption"]:
                assert benchmark_caption_is_true(caption, graph), caption


def test_winoground_each_caption_is_true_of_exactly_one_image(bench, plan):
    root, _, _ = bench
    for record in winoground_lines(root):
        g0 = plan.scene_graphs[f"winoground/data/images/{record['image_0']}.png"]
        g1 = plan.scene_graphs[f"winoground/data/images/{record['image_1']}.png"]
        c0, c1 = record["caption_0"], record["caption_1"]
        assert c0 != c1 and sorted(c0.split()) == sorted(c1.split()), "same words, another order"
        assert benchmark_caption_is_true(c0, g0) and not benchmark_caption_is_true(c0, g1)
        assert benchmark_caption_is_true(c1, g1) and not benchmark_caption_is_true(c1, g0)


def test_scene_graphs_describe_the_written_pixels(bench, plan, world):
    """Each object's centre pixel shows its colour: the graphs the captions were checked on are the images'."""
    root, _, _ = bench
    assert set(plan.images) == {
        str(p.relative_to(root))
        for top in BENCHMARK_DIRS
        for p in (root / top).rglob("*")
        if p.suffix in (".jpg", ".png")
    }
    for relative, graph in plan.scene_graphs.items():
        pixels = Image.open(root / relative).convert("RGB")
        for obj in graph["objects"].values():
            colour = next(a for a in obj["attributes"] if a in COLOURS)
            centre = pixels.getpixel((obj["x"] + obj["w"] // 2, obj["y"] + obj["h"] // 2))
            nearest = min(COLOUR_RGB, key=lambda c: sum((p - q) ** 2 for p, q in zip(centre, COLOUR_RGB[c])))
            assert nearest == colour, (relative, obj, centre)


# ------------------------------------------------------------------ determinism and isolation


def test_two_writes_are_byte_identical(bench, world, tmp_path):
    root, counts, _ = bench
    again = fresh_root(world, tmp_path / "again")
    counts_again = write_compositional_benchmarks(again, CONFIG, sampler_for(CONFIG), train_ids(world))
    assert counts_again == counts
    first, second = tree_digest(root), tree_digest(again)
    assert first == second and len(first) > 300


def test_another_seed_gives_other_files(world, tmp_path):
    other = WorldConfig(**{**CONFIG.to_dict(), "seed": CONFIG.seed + 1})
    plan_a = plan_compositional_benchmarks(world, CONFIG, sampler_for(CONFIG), train_ids(world))
    plan_b = plan_compositional_benchmarks(world, other, sampler_for(other), train_ids(world))
    assert plan_a.files["sugarcrepe/replace_rel.json"] != plan_b.files["sugarcrepe/replace_rel.json"]


def test_the_rest_of_the_world_is_untouched(bench, world):
    root, _, _ = bench
    for path in (world / "gqa").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (root / path.relative_to(world)).read_bytes()
    assert sorted(p.name for p in root.iterdir()) == sorted(["gqa", *BENCHMARK_DIRS])


def test_fresh_ids_collide_with_no_other_id_of_the_world(bench, world):
    root, counts, _ = bench
    planted = {i for ids in counts["leakage_planted_vg_ids"].values() for i in ids}
    gqa_ids = set(load(world, "gqa/train_sceneGraphs.json")) | set(load(world, "gqa/val_sceneGraphs.json"))
    vg_ids = {str(r["image_id"]) for r in load(root, "vg/image_data.json")}
    assert (vg_ids & gqa_ids) - set(train_ids(world)) == set()
    aro_ids = {
        r["image_id"]
        for f in ("visual_genome_relation", "visual_genome_attribution")
        for r in load(root, f"aro/{f}.json")
    }
    assert aro_ids & gqa_ids == planted & aro_ids
    vqa_ids = {
        q["image_id"]
        for split in ("train2014", "val2014")
        for q in load(world, f"vqav2/v2_OpenEnded_mscoco_{split}_questions.json")["questions"]
    }
    coco_ids = {
        int(r["filename"][:12]) for c in SUGARCREPE_CATEGORIES for r in load(root, f"sugarcrepe/{c}.json").values()
    }
    coco_ids |= {int(r["image"][-16:-4]) for r in load(root, "aro/coco_karpathy_test.json")}
    assert not coco_ids & vqa_ids


def test_writing_takes_seconds(bench):
    _, _, seconds = bench
    assert seconds < 15, f"{seconds:.1f} s"


# ------------------------------------------------------------------ planted leakage


def leakage(root: Path, hnc_train: set[str]) -> dict[str, set[str]]:
    """A leakage check as a user would write it: benchmark images joined to HNC training images through VG."""
    vg = load(root, "vg/image_data.json")
    by_coco = {r["coco_id"]: str(r["image_id"]) for r in vg if r["coco_id"] is not None}
    by_flickr = {r["flickr_id"]: str(r["image_id"]) for r in vg if r["flickr_id"] is not None}
    sugarcrepe = {
        by_coco.get(int(r["filename"][:12]))
        for c in SUGARCREPE_CATEGORIES
        for r in load(root, f"sugarcrepe/{c}.json").values()
    }
    coco_order = {by_coco.get(int(r["image"][-16:-4])) for r in load(root, "aro/coco_karpathy_test.json")}
    flickr_order = {by_flickr.get(int(r["image"].split("/")[1][:-4])) for r in load(root, "aro/flickr30k_test.json")}
    found = {
        "sugarcrepe": sugarcrepe,
        "vg_relation": {r["image_id"] for r in load(root, "aro/visual_genome_relation.json")},
        "vg_attribution": {r["image_id"] for r in load(root, "aro/visual_genome_attribution.json")},
        "coco_order": coco_order,
        "flickr30k_order": flickr_order,
        "winoground": set(),  # Winoground's images are no VG images
    }
    return {name: ids & hnc_train for name, ids in found.items()}


def test_a_leakage_check_finds_exactly_the_planted_overlap(bench, world):
    root, counts, _ = bench
    found = leakage(root, set(train_ids(world)))
    assert {name: len(ids) for name, ids in found.items()} == counts["leakage_planted"] == EXPECTED_PLANTED
    assert {name: sorted(ids, key=int) for name, ids in found.items()} == counts["leakage_planted_vg_ids"]
    # Non-planted benchmark images are VG images too, now and then: the check must compare ids.
    vg = load(root, "vg/image_data.json")
    hnc = {int(i) for i in train_ids(world)}
    assert any(r["coco_id"] is not None and r["image_id"] not in hnc for r in vg)


def test_planted_images_are_the_training_images_themselves(bench, world):
    root, counts, _ = bench
    train_graphs = load(world, "gqa/train_sceneGraphs.json")
    vg = {str(r["image_id"]): r for r in load(root, "vg/image_data.json")}
    for record in load(root, "aro/visual_genome_relation.json") + load(root, "aro/visual_genome_attribution.json"):
        if (
            record["image_id"]
            in counts["leakage_planted_vg_ids"]["vg_relation"] + counts["leakage_planted_vg_ids"]["vg_attribution"]
        ):
            image = root / "aro" / "images" / record["image_path"]
            assert image.read_bytes() == (world / "gqa" / "images" / image.name).read_bytes()
            assert benchmark_caption_is_true(record["true_caption"], train_graphs[record["image_id"]])
            assert not benchmark_caption_is_true(record["false_caption"], train_graphs[record["image_id"]])
    for category in SUGARCREPE_CATEGORIES:
        for record in load(root, f"sugarcrepe/{category}.json").values():
            coco_id = int(record["filename"][:12])
            vg_id = next((i for i, r in vg.items() if r["coco_id"] == coco_id), None)
            if vg_id in counts["leakage_planted_vg_ids"]["sugarcrepe"]:
                written = (root / "sugarcrepe" / "val2017" / record["filename"]).read_bytes()
                assert written == (world / "gqa" / "images" / f"{vg_id}.jpg").read_bytes()
                assert benchmark_caption_is_true(record["caption"], train_graphs[vg_id])
                assert not benchmark_caption_is_true(record["negative_caption"], train_graphs[vg_id])


def test_a_small_training_split_plants_what_it_can_and_says_so(world, tmp_path):
    root = fresh_root(world, tmp_path / "small")
    few = train_ids(world)[:5]
    counts = write_compositional_benchmarks(root, CONFIG, sampler_for(CONFIG), few)
    planted = counts["leakage_planted"]
    assert 0 < sum(planted.values()) <= 5
    assert {name: len(ids) for name, ids in leakage(root, set(few)).items()} == planted


def test_no_training_ids_plant_nothing_and_need_no_gqa(tmp_path):
    counts = write_compositional_benchmarks(tmp_path, CONFIG, sampler_for(CONFIG), [])
    assert sum(counts["leakage_planted"].values()) == 0
    assert counts["vg_relation"] == {"items": VG_RELATION_ITEMS}


def test_training_ids_without_gqa_files_are_an_error_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_sceneGraphs.json"):
        write_compositional_benchmarks(tmp_path, CONFIG, sampler_for(CONFIG), ["1234567"])


# ------------------------------------------------------------------ the reader


def test_the_compositional_reader_reads_every_file_and_finds_the_planted_overlap(bench, world):
    reader = pytest.importorskip("hnclip.data.compositional")
    root, counts, _ = bench
    sugarcrepe = reader.read_sugarcrepe(root / "sugarcrepe", root / "sugarcrepe" / "val2017")
    relation = reader.read_vg_relation(root / "aro" / "visual_genome_relation.json", root / "aro" / "images")
    attribution = reader.read_vg_attribution(root / "aro" / "visual_genome_attribution.json", root / "aro" / "images")
    coco = reader.read_order_captions(
        root / "aro" / "coco_karpathy_test.json", root / "aro", benchmark_subset="coco_order", seed=0, collection="coco"
    )
    flickr = reader.read_order_captions(
        root / "aro" / "flickr30k_test.json",
        root / "aro",
        benchmark_subset="flickr30k_order",
        seed=0,
        collection="flickr30k",
    )
    winoground = reader.read_winoground(
        root / "winoground" / "data" / "examples.jsonl", root / "winoground" / "data" / "images"
    )
    vg = reader.read_vg_image_data(root / "vg" / "image_data.json")

    assert len(sugarcrepe) == 7 * SUGARCREPE_PER_CATEGORY and set(sugarcrepe["subset"]) == set(SUGARCREPE_CATEGORIES)
    assert (len(relation), len(attribution), len(winoground)) == (
        VG_RELATION_ITEMS,
        VG_ATTRIBUTION_ITEMS,
        WINOGROUND_ITEMS,
    )
    assert coco["image_path"].nunique() == flickr["image_path"].nunique() == ORDER_IMAGES
    assert 0 < len(coco) <= ORDER_IMAGES * ORDER_CAPTIONS_PER_IMAGE
    assert all(frame.attrs["dropped"]["missing_image"] == 0 for frame in (sugarcrepe, relation, attribution, coco))

    hnc = {int(i) for i in train_ids(world)}
    vg_of_coco = dict(zip(vg["coco_id"].dropna().astype(int), vg.loc[vg["coco_id"].notna(), "vg_id"].astype(int)))
    vg_of_flickr = dict(zip(vg["flickr_id"].dropna().astype(int), vg.loc[vg["flickr_id"].notna(), "vg_id"].astype(int)))

    def leaked(frame, column, mapping=None) -> int:
        ids = frame.groupby("image_path")[column].first().dropna().astype(int)
        vg_ids = ids if mapping is None else ids.map(lambda i: mapping.get(i, -1))
        return int(vg_ids.isin(hnc).sum())

    found = {
        "sugarcrepe": leaked(sugarcrepe, "coco_id", vg_of_coco),
        "vg_relation": leaked(relation, "vg_id"),
        "vg_attribution": leaked(attribution, "vg_id"),
        "coco_order": leaked(coco, "coco_id", vg_of_coco),
        "flickr30k_order": leaked(flickr, "flickr_id", vg_of_flickr),
        "winoground": 0,
    }
    assert found == counts["leakage_planted"] == EXPECTED_PLANTED


def test_the_leakage_report_counts_the_planted_images(bench, world):
    reader = pytest.importorskip("hnclip.data.compositional")
    leakage = pytest.importorskip("hnclip.data.leakage")
    root, counts, _ = bench
    aro = root / "aro"
    tables = {
        "sugarcrepe": reader.read_sugarcrepe(root / "sugarcrepe", root / "sugarcrepe" / "val2017"),
        "vg_relation": reader.read_vg_relation(aro / "visual_genome_relation.json", aro / "images"),
        "vg_attribution": reader.read_vg_attribution(aro / "visual_genome_attribution.json", aro / "images"),
        "coco_order": reader.read_order_captions(
            aro / "coco_karpathy_test.json", aro, benchmark_subset="coco_order", seed=0, collection="coco"
        ),
        "flickr30k_order": reader.read_order_captions(
            aro / "flickr30k_test.json", aro, benchmark_subset="flickr30k_order", seed=0, collection="flickr30k"
        ),
    }
    vg_images = reader.read_vg_image_data(root / "vg" / "image_data.json")
    training = {int(i) for i in train_ids(world)}
    found = {}
    for name, items in tables.items():
        report = leakage.leakage_report(name, items, leakage.overlap_routes(items, vg_images, training))
        found[name] = report["overlapping_images"]
    assert found == {name: n for name, n in counts["leakage_planted"].items() if name != "winoground"}
    assert all(found.values())


def test_write_world_writes_the_same_benchmarks_and_counts(bench, world):
    root, counts, _ = bench
    if not (world / "sugarcrepe").is_dir():
        pytest.skip("write_world does not write the benchmarks yet")
    assert tree_digest(world) == tree_digest(root)
    assert load(world, "world.json")["counts"]["compositional"] == counts
