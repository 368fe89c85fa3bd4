"""HNC pairwise scores, zero-shot classification and drift on a tiny random open_clip model."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from hnclip.evaluate import drift, hnc, zeroshot
from hnclip.evaluate.stats import ReferenceAlignmentError, bootstrap_ci, mcnemar_exact

# The demo's tiny tower (docs/design.md, "Models"), built directly so these tests need no hnclip.models.
TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32}
TINY_TEXT = {"context_length": 16, "width": 64, "layers": 2, "heads": 2}


def tiny_clip(seed: int) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=64, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT, quick_gelu=True).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return tiny_clip(0)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.SimpleTokenizer(context_length=TINY_TEXT["context_length"])


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.image_transform(TINY_VISION["image_size"], is_train=False)


def write_random_images(directory, count: int, seed: int = 0) -> list[str]:
    """Random RGB images of a size other than 32 px, so the preprocessing resize is exercised."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        path = directory / f"img{index:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def direct_image_feature(model, preprocess, path) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(preprocess(Image.open(path).convert("RGB"))[None], normalize=True)[0]


def direct_text_feature(model, tokenizer, text) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokenizer([text]), normalize=True)[0]


# --- HNC ------------------------------------------------------------------------------------------

CAPTIONS = [
    ("the red circle is left of the blue square.", "the blue circle is left of the red square.", "attribute", "attribute"),
    ("the red circle is left of the blue square.", "the red circle is right of the blue square.", "relation", "relation"),
    ("there are two circles.", "there are three circles.", "obj_count", "counting"),
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Ten images with three pairs each; captions repeat across images (as in HNC)."""
    directory = tmp_path_factory.mktemp("hnc_images")
    paths = write_random_images(directory, 10)
    rows = []
    for image_index, path in enumerate(paths):
        for pair_index, (positive, negative, pair_type, group) in enumerate(CAPTIONS):
            rows.append({
                "image_id": f"n{image_index:03d}", "image_path": path.split("/")[-1],
                "positive": positive if image_index % 2 else positive.replace("red", "green"),
                "negative": negative, "type": pair_type, "type_group": group,
                "positive_id": f"{2 * pair_index}", "negative_id": f"{2 * pair_index + 1}",
            })
    return pd.DataFrame(rows), directory


def test_pair_scores_equal_direct_cosines(model, tokenizer, preprocess, pairs):
    frame, image_root = pairs
    scored = hnc.pairwise_scores(model, tokenizer, preprocess, frame, batch_size=4, image_root=image_root,
                                 progress=False)
    assert list(scored.columns[: len(frame.columns)]) == list(frame.columns)
    for row in scored.itertuples():
        image = direct_image_feature(model, preprocess, image_root / row.image_path)
        for text, score in ((row.positive, row.score_positive), (row.negative, row.score_negative)):
            expected = float(image @ direct_text_feature(model, tokenizer, text))
            assert score == pytest.approx(expected, abs=1e-5)


def test_each_image_and_caption_is_encoded_once(tokenizer, preprocess, pairs, monkeypatch):
    frame, image_root = pairs
    counted = tiny_clip(0)
    seen = {"image_rows": 0, "image_calls": 0, "text_rows": 0}
    original_image, original_text = counted.encode_image, counted.encode_text

    def count_images(images, normalize=False):
        seen["image_rows"] += images.shape[0]
        seen["image_calls"] += 1
        return original_image(images, normalize=normalize)

    def count_texts(tokens, normalize=False):
        seen["text_rows"] += tokens.shape[0]
        return original_text(tokens, normalize=normalize)

    monkeypatch.setattr(counted, "encode_image", count_images)
    monkeypatch.setattr(counted, "encode_text", count_texts)
    hnc.pairwise_scores(counted, tokenizer, preprocess, frame, batch_size=3, image_root=image_root,
                        progress=False)
    distinct_captions = len(set(frame["positive"]) | set(frame["negative"]))
    assert seen == {"image_rows": 10, "image_calls": math.ceil(10 / 3), "text_rows": distinct_captions}


def test_scoring_restores_training_mode(tokenizer, preprocess, pairs):
    frame, image_root = pairs
    training = tiny_clip(1).train()
    hnc.pairwise_scores(training, tokenizer, preprocess, frame.head(3), image_root=image_root, progress=False)
    assert training.training


def test_an_image_id_with_two_paths_is_rejected(model, tokenizer, preprocess, pairs):
    frame, image_root = pairs
    broken = frame.copy()
    broken.loc[1, "image_path"] = "elsewhere.png"
    with pytest.raises(hnc.PairTableError, match="image 'n000' has several image_path values"):
        hnc.pairwise_scores(model, tokenizer, preprocess, broken, image_root=image_root, progress=False)


def test_a_missing_image_file_is_named(model, tokenizer, preprocess, pairs):
    frame, image_root = pairs
    broken = frame.copy()
    broken.loc[broken["image_id"] == "n000", "image_path"] = "missing.png"
    with pytest.raises(OSError, match="missing.png"):
        hnc.pairwise_scores(model, tokenizer, preprocess, broken, image_root=image_root, progress=False)


def test_read_pair_shards_names_a_shard_without_columns(tmp_path, pairs):
    frame, _ = pairs
    good, bad = tmp_path / "part-00000.parquet", tmp_path / "part-00001.parquet"
    frame.to_parquet(good)
    frame.drop(columns=["type_group"]).to_parquet(bad)
    assert len(hnc.read_pair_shards([good, good])) == 2 * len(frame)
    with pytest.raises(hnc.PairTableError, match=r"part-00001.parquet lacks columns \['type_group'\]"):
        hnc.read_pair_shards([good, bad])


def scored_by_hand() -> pd.DataFrame:
    """Six images, 2 pairs each, with fixed scores; image n0's second pair is a tie (incorrect)."""
    rows = []
    rng = np.random.default_rng(3)
    for image in range(6):
        for pair, (pair_type, group) in enumerate([("relation", "relation"), ("attribute", "attribute")]):
            positive = float(rng.random())
            negative = positive if (image, pair) == (0, 1) else float(rng.random())
            rows.append({"image_id": f"n{image}", "image_path": f"n{image}.jpg", "positive": "p", "negative": "q",
                         "type": pair_type, "type_group": group, "positive_id": str(2 * pair),
                         "negative_id": str(2 * pair + 1), "score_positive": positive, "score_negative": negative})
    return pd.DataFrame(rows)


def test_a_tie_is_not_correct():
    per_pair = hnc.pairwise_correctness(scored_by_hand())
    tie = per_pair[(per_pair["image_id"] == "n0") & (per_pair["positive_id"] == "2")]
    assert not tie["correct"].item()
    expected = per_pair["score_positive"] > per_pair["score_negative"]
    assert per_pair["correct"].tolist() == expected.tolist()


def test_report_rows_match_direct_computation():
    scored = scored_by_hand()
    per_pair = hnc.pairwise_correctness(scored)
    correct = per_pair["correct"].to_numpy()
    # The baseline differs on three pairs; listed in another order to exercise the key join.
    baseline = per_pair[list(hnc.PAIR_KEY) + ["correct"]].copy()
    baseline.loc[[0, 3, 7], "correct"] = ~baseline.loc[[0, 3, 7], "correct"]
    baseline = baseline.iloc[::-1]
    rows = hnc.pairwise_accuracy_report(scored, model="alpha~1.0/tau~0.05/seed~0", reference={"baseline": baseline},
                                        n_boot=300, seed=5)
    assert [row["subset"] for row in rows] == ["all", "attribute", "relation", "type:attribute", "type:relation"]
    baseline_correct = baseline.sort_index()["correct"].to_numpy()
    images = per_pair["image_id"].to_numpy()
    for row in rows:
        mask = np.ones(len(per_pair), bool) if row["subset"] == "all" else (
            per_pair["type" if row["subset"].startswith("type:") else "type_group"]
            == row["subset"].removeprefix("type:")
        ).to_numpy()
        ci = bootstrap_ci(correct[mask], images[mask], n_boot=300, seed=5)
        assert row == {
            "model": "alpha~1.0/tau~0.05/seed~0", "benchmark": "hnc_test", "subset": row["subset"],
            "metric": "pairwise_accuracy", "value": correct[mask].mean(), "ci_low": ci.ci_low,
            "ci_high": ci.ci_high, "n": int(mask.sum()),
            "delta_vs_baseline": pytest.approx(correct[mask].mean() - baseline_correct[mask].mean()),
            "p_vs_baseline": mcnemar_exact(correct[mask], baseline_correct[mask])["p_value"],
            "test": "mcnemar_exact",
        }
    assert rows[0]["n"] == 12


def test_report_without_reference_has_no_comparison_columns():
    rows = hnc.pairwise_accuracy_report(scored_by_hand(), model="baseline", n_boot=50)
    assert set(rows[0]) == {"model", "benchmark", "subset", "metric", "value", "ci_low", "ci_high", "n"}


def test_report_refuses_a_reference_missing_pairs():
    scored = scored_by_hand()
    reference = hnc.pairwise_correctness(scored).iloc[1:]
    with pytest.raises(ReferenceAlignmentError, match="reference 'control' lacks 1 of 12 evaluated items"):
        hnc.pairwise_accuracy_report(scored, model="m", reference={"control": reference}, n_boot=10)


def test_duplicate_pairs_are_refused():
    scored = scored_by_hand()
    with pytest.raises(hnc.PairTableError, match="appears more than once"):
        hnc.pairwise_correctness(pd.concat([scored, scored.head(1)]))


# --- zero-shot ------------------------------------------------------------------------------------

def test_image_folder_reader(tmp_path):
    write_random_images(tmp_path / "golden_retriever", 2, seed=1)
    write_random_images(tmp_path / "cat", 3, seed=2)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    dataset = zeroshot.read_image_folder(tmp_path)
    assert dataset.classnames == ["cat", "golden retriever"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1]
    assert dataset.item_ids == ["cat/img00.png", "cat/img01.png", "cat/img02.png",
                                "golden_retriever/img00.png", "golden_retriever/img01.png"]


def test_image_folder_reader_names_an_empty_class(tmp_path):
    (tmp_path / "dog").mkdir()
    with pytest.raises(zeroshot.DatasetFormatError, match="dog holds no images"):
        zeroshot.read_image_folder(tmp_path)


def cifar_rows(count: int) -> np.ndarray:
    """N×3072 rows in CIFAR's layout: image i has red = i, green = 100, blue = 200, and red pixel (1, 2) = 255."""
    images = np.zeros((count, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = np.arange(count)[:, None, None]
    images[:, 1], images[:, 2] = 100, 200
    images[:, 0, 1, 2] = 255
    return images.reshape(count, 3072)


def dump_python2_style(path, content) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


def test_cifar10_reader(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    dump_python2_style(directory / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird"]})
    dump_python2_style(directory / "test_batch", {b"data": cifar_rows(4), b"labels": [2, 0, 1, 2],
                                                  b"batch_label": b"testing batch 1 of 1"})
    dataset = zeroshot.read_cifar10(tmp_path)  # the parent of the extracted folder is accepted
    assert dataset.classnames == ["airplane", "automobile", "bird"]
    assert dataset.labels.tolist() == [2, 0, 1, 2]
    assert dataset.item_ids == ["test_batch/0", "test_batch/1", "test_batch/2", "test_batch/3"]
    third = dataset.images[3]
    assert third.shape == (32, 32, 3)
    assert third[0, 0].tolist() == [3, 100, 200]
    assert third[1, 2].tolist() == [255, 100, 200]


def test_cifar100_reader(tmp_path):
    dump_python2_style(tmp_path / "meta", {b"fine_label_names": [b"apple", b"aquarium_fish"],
                                           b"coarse_label_names": [b"fruit", b"fish"]})
    dump_python2_style(tmp_path / "test", {b"data": cifar_rows(3), b"fine_labels": [1, 1, 0],
                                           b"coarse_labels": [1, 1, 0]})
    dataset = zeroshot.read_cifar100(tmp_path)
    assert dataset.classnames == ["apple", "aquarium fish"]
    assert dataset.labels.tolist() == [1, 1, 0]
    assert dataset.images[1][0, 0].tolist() == [1, 100, 200]


def test_cifar_reader_refuses_code_in_a_pickle(tmp_path):
    dump_python2_style(tmp_path / "batches.meta", {b"label_names": [b"a"], b"hook": math.sqrt})
    with pytest.raises(zeroshot.DatasetFormatError, match="math.sqrt is not allowed"):
        zeroshot.read_cifar10(tmp_path)


def test_cifar_reader_names_a_missing_key(tmp_path):
    dump_python2_style(tmp_path / "batches.meta", {b"label_names": [b"a"]})
    dump_python2_style(tmp_path / "test_batch", {b"data": cifar_rows(1)})
    with pytest.raises(zeroshot.DatasetFormatError, match=r"test_batch lacks key b'labels'"):
        zeroshot.read_cifar10(tmp_path)


def test_classifier_is_the_renormalised_prompt_mean(model, tokenizer):
    classnames = ["circle", "red square"]
    templates = ("a photo of a {}.", "a {}.")
    classifier = zeroshot.zero_shot_classifier(model, tokenizer, classnames, templates)
    for index, name in enumerate(classnames):
        mean = torch.stack([direct_text_feature(model, tokenizer, t.format(name)) for t in templates]).mean(0)
        torch.testing.assert_close(classifier[index], mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_template_without_placeholder_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="has no"):
        zeroshot.zero_shot_classifier(model, tokenizer, ["cat"], ["a photo."])


def test_predictions_are_the_argmax_of_cosines(model, tokenizer, preprocess, tmp_path):
    paths = write_random_images(tmp_path, 12, seed=4)
    classifier = zeroshot.zero_shot_classifier(model, tokenizer, ["circle", "square", "triangle"])
    predictions = zeroshot.zero_shot_predictions(model, preprocess, paths, classifier, batch_size=5,
                                                 progress=False)
    expected = [int((classifier @ direct_image_feature(model, preprocess, p)).argmax()) for p in paths]
    assert predictions.tolist() == expected


def test_zeroshot_report_matches_direct_computation():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, size=30)
    predictions = np.where(rng.random(30) < 0.6, labels, (labels + 1) % 3)
    dataset = zeroshot.ClassificationSet([None] * 30, labels, ["circle", "square", "triangle"],
                                         [f"test/{i}" for i in range(30)])
    per_item = zeroshot.zeroshot_correctness(dataset, predictions)
    reference = per_item.assign(correct=rng.random(30) < 0.5)
    rows = zeroshot.zeroshot_report(per_item, dataset.classnames, model="baseline", dataset="synthetic",
                                    reference={"control": reference}, n_boot=200, seed=1)
    assert [row["subset"] for row in rows] == ["all", "class:circle", "class:square", "class:triangle"]
    correct = predictions == labels
    for row, mask in zip(rows, [np.ones(30, bool), labels == 0, labels == 1, labels == 2]):
        ci = bootstrap_ci(correct[mask], n_boot=200, seed=1)
        assert (row["value"], row["ci_low"], row["ci_high"], row["n"]) == (ci.value, ci.ci_low, ci.ci_high, mask.sum())
        assert row["delta_vs_control"] == pytest.approx(correct[mask].mean() - reference["correct"][mask].mean())
        assert row["p_vs_control"] == mcnemar_exact(correct[mask], reference["correct"].to_numpy()[mask])["p_value"]
        assert (row["model"], row["benchmark"], row["dataset"], row["metric"]) == (
            "baseline", "zeroshot", "synthetic", "top1")


# --- drift ----------------------------------------------------------------------------------------

def test_cka_of_a_matrix_with_itself_is_one():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert drift.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 5))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    reference = drift.linear_cka(x, y)
    assert drift.linear_cka(3.7 * x @ rotation + 2.0, y) == pytest.approx(reference, rel=1e-10)
    assert 0.0 < reference < 1.0


def test_cka_hand_computed_case():
    # X's columns are centred and orthogonal (X^T X = 2 I); Y is X's first column, so
    # CKA = ||Y^T X||^2 / (||X^T X|| ||Y^T Y||) = 4 / (2 sqrt(2) · 2) = 1 / sqrt(2).
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert drift.linear_cka(x, x[:, :1]) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    # One feature each: CKA is the squared correlation, here (1/2)^2.
    assert drift.linear_cka([[1.0], [2.0], [3.0]], [[1.0], [0.0], [2.0]]) == pytest.approx(0.25)


def test_cka_of_constant_features_is_refused():
    with pytest.raises(drift.DriftInputError, match="constant"):
        drift.linear_cka(np.ones((5, 2)), np.random.default_rng(0).normal(size=(5, 2)))


def test_streamed_cka_equals_direct_cka():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(90, 7)) + 5.0, rng.normal(size=(90, 4)) - 1.0
    accumulator = drift.LinearCKAAccumulator()
    for rows in (slice(0, 10), slice(10, 55), slice(55, 90)):
        accumulator.update(torch.from_numpy(x[rows]), torch.from_numpy(y[rows]))
    assert accumulator.value() == pytest.approx(drift.linear_cka(x, y), rel=1e-10)


def penultimate_by_hand(model, images: torch.Tensor) -> torch.Tensor:
    """Embed, run every block but the last, drop CLS: LLaVA's hidden_states[-2] patch tokens."""
    with torch.no_grad():
        tokens = model.visual._embeds(images)
        for block in model.visual.transformer.resblocks[:-1]:
            tokens = block(tokens)
    return tokens[:, 1:, :]


@pytest.fixture(scope="module")
def drift_images(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("drift_images"), 9, seed=6)


def test_penultimate_tokens_are_the_last_block_input(model, preprocess, drift_images):
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in drift_images[:3]])
    with torch.no_grad():
        captured = drift.penultimate_patch_tokens(model, batch)
        intermediates = model.visual.forward_intermediates(
            batch, indices=[1], output_fmt="NLC", intermediates_only=True)["image_intermediates"][0]
    assert captured.shape == (3, 16, 64)
    torch.testing.assert_close(captured, penultimate_by_hand(model, batch))
    torch.testing.assert_close(captured, intermediates)
    assert not model.visual.transformer.resblocks[-1]._forward_pre_hooks  # the hook is removed


def test_drift_of_a_model_with_itself_is_one(model, preprocess, drift_images):
    twin = copy.deepcopy(model)
    measurement = drift.measure_drift(model, twin, preprocess, drift_images, batch_size=4, progress=False)
    assert measurement.n_images == 9 and measurement.tokens_per_image == 16
    np.testing.assert_allclose(measurement.per_image_cosine, 1.0, atol=1e-12)
    assert measurement.cka == pytest.approx(1.0, abs=1e-12)
    rows = drift.drift_report(measurement, model="baseline", n_boot=100)
    assert [(r["metric"], r["value"], r["n"]) for r in rows] == [
        ("mean_cosine", pytest.approx(1.0, abs=1e-12), 9), ("cka", pytest.approx(1.0, abs=1e-12), 9)]


def test_drift_against_another_model_matches_direct_computation(model, preprocess, drift_images):
    other = tiny_clip(7)
    measurement = drift.measure_drift(other, model, preprocess, drift_images, batch_size=4, progress=False)
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in drift_images])
    mine, theirs = penultimate_by_hand(other, batch).double(), penultimate_by_hand(model, batch).double()
    per_image = torch.nn.functional.cosine_similarity(mine, theirs, dim=-1).mean(dim=1).numpy()
    np.testing.assert_allclose(measurement.per_image_cosine, per_image, rtol=1e-6)
    expected_cka = drift.linear_cka(mine.flatten(0, 1).numpy(), theirs.flatten(0, 1).numpy())
    assert measurement.cka == pytest.approx(expected_cka, rel=1e-6)
    assert measurement.cka < 0.99
    rows = drift.drift_report(measurement, model="alpha~5.0/tau~0.05/seed~0", n_boot=200, seed=3)
    ci = bootstrap_ci(per_image, n_boot=200, seed=3)
    assert rows[0] == {"model": "alpha~5.0/tau~0.05/seed~0", "benchmark": "drift", "subset": "all",
                       "metric": "mean_cosine", "value": pytest.approx(ci.value),
                       "ci_low": pytest.approx(ci.ci_low), "ci_high": pytest.approx(ci.ci_high), "n": 9}
    assert rows[1]["metric"] == "cka" and rows[1]["ci_low"] is None


def test_fixed_image_sample_ignores_input_order():
    names = [f"img{i}.jpg" for i in range(20)]
    sample = drift.fixed_image_sample(names, 5, seed=2)
    assert sample == drift.fixed_image_sample(list(reversed(names)), 5, seed=2)
    assert len(set(sample)) == 5 and sample == sorted(sample)
    assert drift.fixed_image_sample(names[:3], 5) == sorted(names[:3])


def test_the_image_features_and_penultimate_patches_of_one_forward_pass_equal_their_separate_computations():
    from hnclip.models import create_clip, encode_image_with_patches, penultimate_patch_tokens

    torch.manual_seed(0)
    model, _, _ = create_clip("hnclip-tiny")
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # under no_grad, in eval mode, attention takes PyTorch's fused path: compare like with like
        features, patches = encode_image_with_patches(model, images)
        assert torch.equal(features, model.encode_image(images))
        assert torch.equal(patches, penultimate_patch_tokens(model, images))
    model.set_grad_checkpointing(True)
    model.train()
    features, patches = encode_image_with_patches(model, images.requires_grad_())
    (features.sum() + patches.sum()).backward()  # the recompute in backward must not replace the captured tokens
    assert patches.shape == (3, 16, model.visual.transformer.width) and images.grad is not None
