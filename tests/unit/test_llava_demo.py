"""The demo LLaVA: tokenizer, LLaVA-1.5 prompt and image preprocessing, model assembly, saving, pre-training."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    LlavaForConditionalGeneration,
)

from hnclip.llava.demo_model import (
    DemoLlavaError,
    build_demo_llava,
    demo_image_processor,
    save_demo_llava,
    write_toy_vqa_questions,
)
from hnclip.llava.pretrain import (
    IGNORE_INDEX,
    PretrainDataError,
    build_training_examples,
    caption_examples,
    load_caption_tables,
    pretrain_demo_llava,
    tokenizer_training_texts,
)
from hnclip.llava.prompt import (
    LLAVA_PAD_COLOUR,
    expand_image_tokens,
    llava15_followup_turn,
    llava15_prompt,
    num_image_tokens,
    pad_colour_from_mean,
    pad_to_square,
    preprocess_images,
)
from hnclip.llava.tokenizer import DemoTokenizerError, SPECIAL_TOKENS, image_token_id, train_demo_tokenizer

torch.set_num_threads(1)

TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu")


def toy_world(root, *, n_images: int, seed: int) -> dict:
    """A toy question table under ``root`` (also as Parquet), its tokenizer and a random tiny tower with projection."""
    questions = write_toy_vqa_questions(root / "images", n_images=n_images, seed=seed)
    parquet = root / "questions.parquet"
    questions.to_parquet(parquet)
    tokenizer = train_demo_tokenizer(tokenizer_training_texts(questions), root / "tokenizer")
    torch.manual_seed(0)
    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_TOWER)).eval()
    return {"root": root, "questions": questions, "parquet": parquet, "tokenizer": tokenizer, "tower": tower}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_world(tmp_path_factory.mktemp("toy"), n_images=24, seed=3)


# --------------------------------------------------------------------------------------------------------------
# Prompt: snapshots of the exact strings (these fail when the protocol drifts)
# --------------------------------------------------------------------------------------------------------------

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def test_prompt_snapshot_without_ocr():
    assert llava15_prompt("What color is the bus?") == (
        SYSTEM + " USER: <image>\nWhat color is the bus?\n"
        "Answer the question using a single word or phrase. ASSISTANT:"
    )


def test_prompt_snapshot_with_ocr():
    assert llava15_prompt(" what is written on the sign? ", ocr_tokens=["STOP", "a", "7"]) == (
        SYSTEM + " USER: <image>\nwhat is written on the sign?\nReference OCR token: STOP, a, 7\n"
        "Answer the question using a single word or phrase. ASSISTANT:"
    )


def test_followup_turn_snapshot():
    assert llava15_followup_turn("Is it red?") == (
        "USER: Is it red?\nAnswer the question using a single word or phrase. ASSISTANT:")
    assert llava15_followup_turn("q?", ocr_tokens=["A"]) == (
        "USER: q?\nReference OCR token: A\nAnswer the question using a single word or phrase. ASSISTANT:")
    with pytest.raises(ValueError, match="empty question"):
        llava15_followup_turn(" ")


def test_ocr_line_is_there_whenever_tokens_are_given_even_none():
    """LLaVA's TextVQA file writes the line for an image without tokens too; no tokens given: no line."""
    assert llava15_prompt("q?", ocr_tokens=[]) == llava15_prompt("q?").replace(
        "q?\n", "q?\nReference OCR token: \n")
    with pytest.raises(ValueError, match="empty question"):
        llava15_prompt("  ")


def test_expand_image_tokens_repeats_the_one_placeholder():
    expanded = expand_image_tokens("USER: <image>\nq", 4)
    assert expanded == "USER: <image><image><image><image>\nq"
    with pytest.raises(ValueError, match="exactly one <image>, found 2"):
        expand_image_tokens("<image><image>", 3)
    with pytest.raises(ValueError, match="exactly one <image>, found 0"):
        expand_image_tokens("no image", 3)


def test_num_image_tokens_matches_llava_15():
    real = CLIPVisionConfig(image_size=336, patch_size=14)
    assert num_image_tokens(real) == 576
    assert num_image_tokens(real, "full") == 577
    assert num_image_tokens(CLIPVisionConfig(image_size=32, patch_size=8)) == 16


def test_pad_colour_rule_gives_llava_colour_for_openai_mean():
    assert pad_colour_from_mean([0.48145466, 0.4578275, 0.40821073]) == LLAVA_PAD_COLOUR == (122, 116, 104)


def test_pad_to_square_centres_with_background():
    red = Image.new("RGB", (64, 47), (255, 0, 0))
    squared = np.asarray(pad_to_square(red, (1, 2, 3)))
    assert squared.shape == (64, 64, 3)
    # offset (64 - 47) // 2 = 8 above, the odd row below (9 rows), as LLaVA's expand2square
    assert (squared[:8] == (1, 2, 3)).all() and (squared[55:] == (1, 2, 3)).all()
    assert (squared[8:55] == (255, 0, 0)).all()
    tall = np.asarray(pad_to_square(Image.new("RGB", (30, 40), (0, 255, 0))))
    assert (tall[:, :5] == LLAVA_PAD_COLOUR).all() and (tall[:, 5:35] == (0, 255, 0)).all()
    square = Image.new("RGB", (8, 8), (9, 9, 9))
    assert np.array_equal(np.asarray(pad_to_square(square)), np.asarray(square))


def test_preprocess_images_equals_pad_resize_normalise():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    processor = demo_image_processor(CLIPVisionConfig(image_size=32, patch_size=8))
    pixel_values = preprocess_images([image, image], processor)
    reference = np.asarray(pad_to_square(image).resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    reference = (reference - np.array(processor.image_mean)) / np.array(processor.image_std)
    assert pixel_values.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pixel_values[1], torch.tensor(reference.transpose(2, 0, 1), dtype=torch.float32),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens_bos_and_left_padding(toy):
    tokenizer = toy["tokenizer"]
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert image_token_id(tokenizer) == 4
    ids = tokenizer("USER: <image><image>\nWhat COLOR?")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "user", ":", "<image>", "<image>", "what", "color", "?"]
    batch = tokenizer(["red", "what color is"], padding=True)
    assert batch["input_ids"][0][:2] == [3, 3] and batch["attention_mask"][0] == [0, 0, 1, 1]
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra ∆")["input_ids"]) == [
        "<s>", "z", "##e", "##b", "##r", "##a", "<unk>"]


def test_tokenizer_spells_sign_text_and_decodes_it_back(toy):
    tokenizer = toy["tokenizer"]
    tokens = tokenizer.convert_ids_to_tokens(
        tokenizer(llava15_prompt("What letter is on the sign?", ocr_tokens=["DL", "7"]))["input_ids"])
    ocr_at = tokens.index("token") + 2
    assert tokens[ocr_at - 4:ocr_at + 5] == ["reference", "ocr", "token", ":", "d", "##l", ",", "7", "answer"]
    answer_ids = tokenizer(" dl", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(answer_ids) == ["d", "##l"]
    assert tokenizer.decode(answer_ids) == "dl"


def test_tokenizer_keeps_question_words_and_vqa_answers_whole_but_spells_sign_text(toy, tmp_path):
    signs = toy["questions"][toy["questions"]["dataset"] == "textvqa"].iloc[:2].copy()
    signs["ocr_tokens"] = [["QZ"], []]  # the second sign's word was missed by the OCR
    signs["majority_answer"], signs["answers"] = ["qz", "jw"], [["qz"] * 10, ["jw"] * 10]
    questions = pd.concat([toy["questions"], signs], ignore_index=True)
    vocabulary = set(train_demo_tokenizer(tokenizer_training_texts(questions), tmp_path / "tok").get_vocab())
    assert {"reference", "ocr", "token", "what", "circle", "yes", "no", "red", "blue"} <= vocabulary
    assert not {"qz", "jw"} & vocabulary and {"q", "##z", "j", "##w"} <= vocabulary


def test_tokenizer_round_trips_through_save_pretrained(toy):
    reloaded = AutoTokenizer.from_pretrained(toy["root"] / "tokenizer")
    text = llava15_prompt("What shape is shown?")
    assert reloaded(text)["input_ids"] == toy["tokenizer"](text)["input_ids"]
    assert reloaded.padding_side == "left"
    assert reloaded.decode(reloaded("yellow circle")["input_ids"], skip_special_tokens=True) == "yellow circle"


def test_tokenizer_refuses_empty_corpus(tmp_path):
    with pytest.raises(DemoTokenizerError, match="no words"):
        train_demo_tokenizer(["", "  "], tmp_path / "tok")


# --------------------------------------------------------------------------------------------------------------
# Model assembly
# --------------------------------------------------------------------------------------------------------------


def test_build_demo_llava_config(toy):
    model = build_demo_llava(toy["tower"], toy["tokenizer"], text_hidden=32, text_heads=2)
    config = model.config
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu"
    assert config.image_token_id == image_token_id(toy["tokenizer"])
    assert config.image_seq_length == 16
    assert config.text_config.model_type == "llama" and config.text_config.vocab_size == len(toy["tokenizer"])
    assert config.text_config.hidden_size == 32 and config.text_config.num_hidden_layers == 2
    assert model.generation_config.pad_token_id == toy["tokenizer"].pad_token_id


@pytest.mark.parametrize("with_projection", [True, False])
def test_build_demo_llava_copies_tower_weights(toy, with_projection):
    source = toy["tower"] if with_projection else CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER)).eval()
    model = build_demo_llava(source, toy["tokenizer"], text_hidden=32, text_heads=2)
    tower = model.model.vision_tower.state_dict()
    prefix = "vision_model." if with_projection else ""
    source_state = source.state_dict()
    assert len(tower) == len([k for k in source_state if not k.startswith("visual_projection")])
    for key, value in tower.items():
        assert torch.equal(value, source_state[prefix + key]), key


def test_image_features_are_projected_penultimate_patch_tokens(toy):
    """LLaVA's contract: projector(hidden_states[-2] without CLS) of the given tower, computed naively here."""
    model = build_demo_llava(toy["tower"], toy["tokenizer"], text_hidden=32, text_heads=2).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = toy["tower"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        projector = model.model.multi_modal_projector
        expected = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(hidden)))
        features = model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(torch.stack(list(features)), expected, atol=1e-6, rtol=1e-5)


def test_build_demo_llava_refuses_bad_sizes(toy):
    one_layer = CLIPVisionConfig(**{**TINY_TOWER, "num_hidden_layers": 1})
    with pytest.raises(DemoLlavaError, match="at least 2 layers"):
        build_demo_llava(one_layer, toy["tokenizer"])
    with pytest.raises(DemoLlavaError, match="not divisible"):
        build_demo_llava(toy["tower"], toy["tokenizer"], text_hidden=30, text_heads=4)


def test_save_demo_llava_writes_a_loadable_checkpoint(toy, tmp_path):
    model = build_demo_llava(toy["tower"], toy["tokenizer"], text_hidden=32, text_heads=2)
    processor = demo_image_processor(toy["tower"].config)
    out = save_demo_llava(model, toy["tokenizer"], processor, tmp_path / "llava", extra={"note": "test"})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "llava_protocol.json", "generation_config.json"} <= names
    reloaded = LlavaForConditionalGeneration.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    loaded_processor = CLIPImageProcessorPil.from_pretrained(out)
    assert loaded_processor.crop_size == {"height": 32, "width": 32}
    assert loaded_processor.image_mean == pytest.approx(processor.image_mean)
    protocol = json.loads((out / "llava_protocol.json").read_text())
    assert protocol["pad_colour"] == [122, 116, 104] and protocol["num_image_tokens"] == 16
    assert protocol["note"] == "test"


def _tiny_open_clip(open_clip, seed: int):
    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=3, width=32, head_width=16, image_size=32, patch_size=8, mlp_ratio=2),
        text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
        quick_gelu=True,
    ).eval()


def test_demo_checkpoint_accepts_an_exported_open_clip_tower(toy, tmp_path):
    """The export stage swaps a tower into the demo checkpoint; the LM and projector stay bit-identical."""
    open_clip = pytest.importorskip("open_clip")
    from hnclip.llava.export import to_hf_vision_model
    from hnclip.llava.tower_delta import export_tower_delta, files_dir, load_llava

    hf_tower = to_hf_vision_model(_tiny_open_clip(open_clip, seed=0))
    model = build_demo_llava(hf_tower, toy["tokenizer"], text_hidden=32, text_heads=2)
    base = save_demo_llava(model, toy["tokenizer"], demo_image_processor(hf_tower.config), tmp_path / "base")
    export_tower_delta(base, _tiny_open_clip(open_clip, seed=1), tmp_path / "swapped")
    swapped = load_llava(tmp_path / "swapped")
    for key, value in model.state_dict().items():
        if not key.startswith("model.vision_tower."):
            assert torch.equal(swapped.state_dict()[key], value), key
    assert not torch.equal(swapped.model.vision_tower.embeddings.patch_embedding.weight,
                           model.model.vision_tower.embeddings.patch_embedding.weight)
    assert (files_dir(tmp_path / "swapped") / "llava_protocol.json").is_file()  # the protocol is the base's


# --------------------------------------------------------------------------------------------------------------
# Pre-training
# --------------------------------------------------------------------------------------------------------------


def test_training_examples_mask_the_prompt_and_end_with_eos(toy):
    tokenizer, questions = toy["tokenizer"], toy["questions"]
    rows = {p: i for i, p in enumerate(sorted(set(questions["image_path"])))}
    examples = build_training_examples(questions, tokenizer, 16, rows, ocr_prompt_fraction=1.0, seed=0)
    for example, row in zip(examples, questions.itertuples()):
        answer_at = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        prompt_ids, answer_ids = example.input_ids[:answer_at], example.input_ids[answer_at:]
        assert list(example.labels[answer_at:]) == list(answer_ids)
        assert answer_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer_ids, skip_special_tokens=True) == row.majority_answer
        assert prompt_ids.count(image_token_id(tokenizer)) == 16
        has_ocr_line = "reference ocr token" in tokenizer.decode(prompt_ids)
        assert has_ocr_line == (len(row.ocr_tokens) > 0)
        assert example.image_row == rows[row.image_path]
    no_ocr = build_training_examples(questions, tokenizer, 16, rows, ocr_prompt_fraction=0.0, seed=0)
    assert not any("reference" in tokenizer.decode(e.input_ids) for e in no_ocr)


def _split_at_eos(ids, eos_id):
    parts, current = [], []
    for token in ids:
        if token == eos_id:
            parts.append(current)
            current = []
        else:
            current.append(token)
    return parts


def test_conversations_ask_each_images_questions_in_turns(toy):
    tokenizer, questions = toy["tokenizer"], toy["questions"]
    rows = {p: i for i, p in enumerate(sorted(set(questions["image_path"])))}
    examples = build_training_examples(questions, tokenizer, 16, rows, ocr_prompt_fraction=1.0, seed=0, max_turns=3)
    per_image = questions.groupby("image_path", sort=False)["majority_answer"].apply(list)
    expected = [(path, answers[k:k + 3]) for path, answers in per_image.items() for k in range(0, len(answers), 3)]
    assert len(examples) == len(expected)
    for example, (path, answers) in zip(examples, expected):
        assert example.image_row == rows[path]
        assert example.input_ids.count(image_token_id(tokenizer)) == 16  # the image only in the first turn
        assert example.input_ids.count(tokenizer.bos_token_id) == 1
        targets = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
        assert [tokenizer.decode(a) for a in _split_at_eos(targets, tokenizer.eos_token_id)] == answers
        text = tokenizer.decode(example.input_ids)
        assert text.count("assistant :") == len(answers) and text.count("a chat between") == 1
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        build_training_examples(questions, tokenizer, 16, rows, ocr_prompt_fraction=1.0, seed=0, max_turns=0)


@pytest.fixture(scope="module")
def toy_captions(toy):
    """A caption shard in the preprocess stage's HNC schema: 'a {colour} {shape}' for each shape image."""
    colour_questions = toy["questions"][toy["questions"]["question_type"] == "what color is the"]
    captions = pd.DataFrame({
        "image_path": colour_questions["image_path"],
        "positive": [f"a {row.majority_answer} {row.question.split()[-1].rstrip('?')}"
                     for row in colour_questions.itertuples()],
        "negative": "unused",
    })
    path = toy["root"] / "captions.parquet"
    pd.concat([captions, captions]).to_parquet(path)  # duplicates, as HNC repeats a positive per negative
    return path


def test_caption_examples_are_plain_format_image_then_caption(toy, toy_captions):
    tokenizer = toy["tokenizer"]
    captions = load_caption_tables([toy_captions])
    assert list(captions.columns) == ["image_path", "caption"] and not captions.duplicated().any()
    rows = {p: i for i, p in enumerate(sorted(set(captions["image_path"])))}
    examples = caption_examples(captions, tokenizer, 16, rows)
    assert len(examples) == len(captions) > 0
    for example, row in zip(examples, captions.itertuples()):
        prompt_length = 1 + 16
        assert example.input_ids[:prompt_length] == (tokenizer.bos_token_id, *[image_token_id(tokenizer)] * 16)
        assert set(example.labels[:prompt_length]) == {IGNORE_INDEX}
        assert example.labels[prompt_length:] == example.input_ids[prompt_length:]
        assert tokenizer.decode(example.input_ids[prompt_length:], skip_special_tokens=True) == row.caption
        assert example.image_row == rows[row.image_path]


def test_caption_tables_name_a_missing_column(toy, tmp_path):
    broken = tmp_path / "shard.parquet"
    pd.DataFrame({"image_path": ["x.jpg"]}).to_parquet(broken)
    with pytest.raises(PretrainDataError, match=r"shard.parquet lacks column\(s\) \['positive'\]"):
        load_caption_tables([broken])


def test_alignment_runs_before_instruction_tuning_with_the_tower_frozen(toy, toy_captions, tmp_path):
    model = build_demo_llava(toy["tower"], toy["tokenizer"], text_hidden=32, text_heads=2)
    tower_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    log = tmp_path / "train_log.csv"
    summary = pretrain_demo_llava(
        model, toy["tokenizer"], demo_image_processor(toy["tower"].config), [toy["parquet"]],
        steps=3, lr=3e-3, batch_size=4, seed=0, log_path=log, max_turns=2,
        caption_parquets=[toy_captions], alignment_steps=4, alignment_batch_size=4,
    )
    with open(log) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["stage"], int(r["step"])) for r in rows] == (
        [("alignment", k) for k in range(1, 5)] + [("instruction", k) for k in range(1, 4)])
    assert summary["alignment"]["steps"] == 4 and summary["steps"] == 3
    assert summary["alignment"]["n_captions"] == len(load_caption_tables([toy_captions]))
    for key, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower_before[key]), f"frozen tower tensor {key} changed"
    with pytest.raises(PretrainDataError, match="needs caption tables"):
        pretrain_demo_llava(model, toy["tokenizer"], demo_image_processor(toy["tower"].config), [toy["parquet"]],
                            steps=1, lr=1e-3, batch_size=2, seed=0, log_path=tmp_path / "x.csv", alignment_steps=2)


def test_pretraining_freezes_the_tower_and_lowers_the_loss(toy, tmp_path):
    model = build_demo_llava(toy["tower"], toy["tokenizer"], text_hidden=32, text_heads=2)
    tower_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    projector_before = model.model.multi_modal_projector.linear_1.weight.clone()
    log = tmp_path / "train_log.csv"
    summary = pretrain_demo_llava(
        model, toy["tokenizer"], demo_image_processor(toy["tower"].config), [toy["parquet"]],
        steps=12, lr=3e-3, batch_size=8, seed=0, log_path=log,
    )
    for key, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower_before[key]), f"frozen tower tensor {key} changed"
    assert all(not p.requires_grad for p in model.model.vision_tower.parameters())
    assert not model.model.vision_tower.training
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight, projector_before)
    with open(log) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert summary["n_questions"] == len(toy["questions"])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert summary["frozen_tower_parameters"] == sum(v.numel() for v in tower_before.values())


def test_pretraining_is_reproducible(toy, tmp_path):
    losses = []
    for run in range(2):
        model = build_demo_llava(toy["tower"], toy["tokenizer"], text_hidden=32, text_heads=2, seed=5)
        pretrain_demo_llava(model, toy["tokenizer"], demo_image_processor(toy["tower"].config), [toy["parquet"]],
                            steps=3, lr=1e-3, batch_size=8, seed=1, log_path=tmp_path / f"log{run}.csv")
        losses.append(pd.read_csv(tmp_path / f"log{run}.csv")["loss"].tolist())
    assert losses[0] == losses[1]


def test_pretraining_names_a_missing_column(toy, tmp_path):
    broken = tmp_path / "broken.parquet"
    toy["questions"].drop(columns=["majority_answer"]).to_parquet(broken)
    model = build_demo_llava(toy["tower"], toy["tokenizer"], text_hidden=32, text_heads=2)
    with pytest.raises(ValueError, match=r"broken.parquet lacks column\(s\) \['majority_answer'\]"):
        pretrain_demo_llava(model, toy["tokenizer"], demo_image_processor(toy["tower"].config), [broken],
                            steps=1, lr=1e-3, batch_size=2, seed=0, log_path=tmp_path / "log.csv")
