"""LLaVA VQA inference: batched greedy answers equal batch-1 answers, resume after a kill, chunk and gather."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from hnclip.llava.demo_model import build_demo_llava, demo_image_processor, save_demo_llava
from hnclip.llava.infer import (
    PredictionFileError,
    QuestionTableError,
    answer_questions,
    chunk_questions,
    gather_chunks,
    generate_answers,
    load_llava_for_inference,
    predict_vqa,
    LlavaForInference,
    read_completed_predictions,
)
from hnclip.llava.pretrain import pretrain_demo_llava
from hnclip.llava.prompt import expand_image_tokens, llava15_prompt, preprocess_images

from tests.unit.test_llava_demo import TINY_TOWER, toy_world

torch.set_num_threads(1)
MAX_NEW_TOKENS = 6


def _input_sensitive(model):
    """Re-draw projector and LM weights large, so greedy output depends strongly on image and question.

    A tiny model at its default init says nearly the same thing for every input, which would make
    "batched equals unbatched" easy to pass by accident.
    """
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and not name.startswith("model.vision_tower."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny LLaVA trained for a few steps on toy questions, plus an untrained twin that babbles long answers."""
    root = tmp_path_factory.mktemp("demo")
    world = toy_world(root, n_images=14, seed=7)
    questions, parquet, tokenizer, tower = world["questions"], world["parquet"], world["tokenizer"], world["tower"]
    processor = demo_image_processor(tower.config)
    trained = build_demo_llava(tower, tokenizer, text_hidden=32, text_heads=2, seed=0)
    pretrain_demo_llava(trained, tokenizer, processor, [parquet], steps=15, lr=3e-3, batch_size=8, seed=0,
                        log_path=root / "log.csv")
    untrained = _input_sensitive(build_demo_llava(tower, tokenizer, text_hidden=32, text_heads=2, seed=1))
    return {"root": root, "questions": questions, "parquet": parquet, "tokenizer": tokenizer,
            "processor": processor, "trained": trained, "untrained": untrained}


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answer(demo, model_key: str, questions: pd.DataFrame, out: Path, **kwargs) -> list[dict]:
    kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    answer_questions(demo[model_key], demo["tokenizer"], demo["processor"], questions, out, **kwargs)
    return _predictions(out)


# --------------------------------------------------------------------------------------------------------------
# Batched greedy decoding equals batch-1 decoding
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_key", ["trained", "untrained"])
def test_batch_16_answers_equal_batch_1_answers(demo, tmp_path, model_key):
    batched = _answer(demo, model_key, demo["questions"], tmp_path / "b16.jsonl", batch_size=16)
    single = _answer(demo, model_key, demo["questions"], tmp_path / "b1.jsonl", batch_size=1)
    assert [r["question_id"] for r in batched] == demo["questions"]["question_id"].tolist()
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert [r["generated_tokens"] for r in batched] == [r["generated_tokens"] for r in single]
    if model_key == "untrained":
        # A random model runs to max_new_tokens with varied words: a demanding comparison, not "no" == "no".
        assert len({r["prediction"] for r in single}) > len(single) // 2
        assert any(r["generated_tokens"] == MAX_NEW_TOKENS for r in single)


def test_prompts_of_one_batch_really_differ_in_length(demo):
    """Left padding is only exercised when prompt lengths differ within a batch (the OCR line, question words)."""
    tokenizer = demo["tokenizer"]
    lengths = {len(tokenizer(expand_image_tokens(llava15_prompt(q), 16))["input_ids"])
               for q in demo["questions"]["question"].iloc[:16]}
    assert len(lengths) > 1


def test_right_padding_would_change_answers(demo):
    """The equality test above can fail: generating from right-padded prompts changes what the model says."""
    llava = LlavaForInference(demo["untrained"], demo["tokenizer"], demo["processor"], (122, 116, 104))
    rows = list(demo["questions"].itertuples(index=False))[:16]
    alone = [generate_answers(llava, [row], use_ocr=False, max_new_tokens=MAX_NEW_TOKENS)[0][0] for row in rows]
    prompts = [expand_image_tokens(llava15_prompt(row.question), 16) for row in rows]
    encoded = demo["tokenizer"](prompts, return_tensors="pt", padding=True, padding_side="right")
    pixels = preprocess_images([Image.open(row.image_path) for row in rows], demo["processor"])
    with torch.inference_mode():
        output = demo["untrained"].generate(**encoded, pixel_values=pixels, do_sample=False,
                                            max_new_tokens=MAX_NEW_TOKENS)
    right = demo["tokenizer"].batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [t.strip() for t in right] != alone


def test_ocr_flag_changes_prompt_and_is_recorded(demo, tmp_path):
    signs = demo["questions"][demo["questions"]["dataset"] == "textvqa"]
    assert len(signs) > 0
    records = _answer(demo, "trained", signs, tmp_path / "ocr.jsonl", use_ocr=True)
    assert all(r["use_ocr"] and r["prompt_variant"].endswith("_ocr") for r in records)
    assert [r["ocr_tokens"] for r in records] == [list(t) for t in signs["ocr_tokens"]]
    plain = _answer(demo, "trained", signs, tmp_path / "plain.jsonl")
    assert all(not r["use_ocr"] and r["ocr_tokens"] == [] for r in plain)


# --------------------------------------------------------------------------------------------------------------
# Resume after a kill
# --------------------------------------------------------------------------------------------------------------


def test_killed_run_resumes_without_duplicates_or_gaps(demo, tmp_path):
    questions = demo["questions"]
    uninterrupted = _answer(demo, "untrained", questions, tmp_path / "full.jsonl", batch_size=4)
    work = tmp_path / "work.jsonl"
    _answer(demo, "untrained", questions.iloc[:9], work, batch_size=4)
    # A kill in the middle of a write leaves half of the next line, without its newline.
    next_line = json.dumps(uninterrupted[9])
    with open(work, "a") as handle:
        handle.write(next_line[: len(next_line) // 2])
    resumed = _answer(demo, "untrained", questions, work, batch_size=4)
    ids = [r["question_id"] for r in resumed]
    assert ids == questions["question_id"].tolist()
    assert len(set(ids)) == len(ids)
    assert resumed == uninterrupted


def test_complete_file_is_left_alone(demo, tmp_path):
    out = tmp_path / "done.jsonl"
    _answer(demo, "trained", demo["questions"].iloc[:5], out)
    before = out.read_bytes()
    _answer(demo, "trained", demo["questions"].iloc[:5], out)
    assert out.read_bytes() == before


def test_resume_refuses_other_settings_and_foreign_questions(demo, tmp_path):
    out = tmp_path / "p.jsonl"
    _answer(demo, "trained", demo["questions"].iloc[:3], out)
    with pytest.raises(PredictionFileError, match="max_new_tokens=6, this run uses 9"):
        _answer(demo, "trained", demo["questions"].iloc[:5], out, max_new_tokens=9)
    with pytest.raises(PredictionFileError, match="prompt_variant"):
        _answer(demo, "trained", demo["questions"].iloc[:5], out, use_ocr=True)
    with pytest.raises(PredictionFileError, match="not in this question table"):
        _answer(demo, "trained", demo["questions"].iloc[3:6], out)


def test_malformed_middle_line_is_an_error_naming_the_line(demo, tmp_path):
    out = tmp_path / "bad.jsonl"
    out.write_text('{"question_id": 1, "prediction": "a"}\nnot json\n{"question_id": 2, "prediction": "b"}\n')
    with pytest.raises(PredictionFileError, match=r"bad.jsonl:2: not a JSON line"):
        read_completed_predictions(out)
    out.write_text('{"question_id": 1, "prediction": "a"}\n{"question_id": 1, "prediction": "b"}\n')
    with pytest.raises(PredictionFileError, match="question_id 1 appears more than once"):
        read_completed_predictions(out)


def test_duplicate_question_ids_in_the_table_are_refused(demo, tmp_path):
    doubled = pd.concat([demo["questions"].iloc[:2], demo["questions"].iloc[:1]])
    with pytest.raises(QuestionTableError, match="repeats question_id"):
        _answer(demo, "trained", doubled, tmp_path / "x.jsonl")


# --------------------------------------------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------------------------------------------


def test_chunks_partition_the_questions_deterministically(demo):
    questions = demo["questions"]
    shuffled = questions.sample(frac=1.0, random_state=0)
    chunks = [chunk_questions(questions, 4, k)["question_id"].tolist() for k in range(4)]
    assert chunks == [chunk_questions(shuffled, 4, k)["question_id"].tolist() for k in range(4)]
    flat = [q for chunk in chunks for q in chunk]
    assert flat == sorted(questions["question_id"].tolist())
    size = -(-len(questions) // 4)
    assert [len(c) for c in chunks[:-1]] == [size] * 3
    with pytest.raises(ValueError, match="0 <= k < n_chunks"):
        chunk_questions(questions, 4, 4)


def test_gather_chunks_writes_complete_file_in_expected_order(demo, tmp_path):
    questions = demo["questions"]
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"chunk{k}.jsonl")
        _answer(demo, "trained", chunk_questions(questions, 3, k), paths[-1])
    expected = questions["question_id"].tolist()[::-1]
    out = gather_chunks(paths, tmp_path / "final" / "predictions.jsonl", expected)
    assert [r["question_id"] for r in _predictions(out)] == expected


def _write_lines(path: Path, ids: list[int]) -> Path:
    path.write_text("".join(json.dumps({"question_id": q, "prediction": "x"}) + "\n" for q in ids))
    return path


@pytest.mark.parametrize(
    "chunks, expected, message",
    [
        ([[1, 2], [2, 3]], [1, 2, 3], r"question_id 2 is in both .*c0.jsonl and .*c1.jsonl"),
        ([[1, 2], [4]], [1, 2, 3, 4], r"1 question\(s\) have no prediction .* e.g. \[3\]"),
        ([[1, 2], [3, 9]], [1, 2, 3], r"1 unexpected question\(s\) .* e.g. \[9\] from .*c1.jsonl"),
    ],
)
def test_gather_refuses_duplicates_gaps_and_strangers(tmp_path, chunks, expected, message):
    paths = [_write_lines(tmp_path / f"c{k}.jsonl", ids) for k, ids in enumerate(chunks)]
    out = tmp_path / "out.jsonl"
    with pytest.raises(PredictionFileError, match=message):
        gather_chunks(paths, out, expected)
    assert not out.exists()


def test_gather_refuses_a_chunk_cut_mid_line(tmp_path):
    chunk = _write_lines(tmp_path / "c0.jsonl", [1, 2])
    with open(chunk, "a") as handle:
        handle.write('{"question_id": 3, "predic')
    with pytest.raises(PredictionFileError, match="incomplete line"):
        gather_chunks([chunk], tmp_path / "out.jsonl", [1, 2, 3])
    assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------------------------------------------
# From a saved checkpoint
# --------------------------------------------------------------------------------------------------------------


def test_predict_vqa_from_saved_checkpoint_matches_in_memory_model(demo, tmp_path):
    checkpoint = save_demo_llava(demo["trained"], demo["tokenizer"], demo["processor"], tmp_path / "llava")
    loaded = load_llava_for_inference(checkpoint)
    assert loaded.pad_colour == (122, 116, 104) and loaded.tokenizer.padding_side == "left"
    out = tmp_path / "vqa" / "predictions.jsonl"
    summary = predict_vqa(checkpoint, demo["parquet"], out, batch_size=8, max_new_tokens=MAX_NEW_TOKENS)
    assert summary["n_questions"] == len(demo["questions"])
    assert not (tmp_path / "vqa" / "predictions.jsonl.state").exists()
    in_memory = _answer(demo, "trained", demo["questions"], tmp_path / "mem.jsonl", batch_size=8)
    assert _predictions(out) == in_memory


class Killed(Exception):
    """Stands for a job killed after answering, before it published its predictions."""


def _killed_before_publishing(monkeypatch, checkpoint, parquet, out, state):
    def kill(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr("hnclip.llava.infer.gather_chunks", kill)
        with pytest.raises(Killed):
            predict_vqa(checkpoint, parquet, out, state_dir=state, batch_size=8, max_new_tokens=MAX_NEW_TOKENS)
    assert (state / "predictions.partial.jsonl").stat().st_size > 0


def test_partial_predictions_of_a_re_exported_model_are_set_aside(demo, tmp_path, monkeypatch, caplog):
    checkpoint = tmp_path / "llava"
    save_demo_llava(demo["untrained"], demo["tokenizer"], demo["processor"], checkpoint)
    out, state = tmp_path / "vqa" / "predictions.jsonl", tmp_path / "state" / "chunk-0"
    _killed_before_publishing(monkeypatch, checkpoint, demo["parquet"], out, state)
    save_demo_llava(demo["trained"], demo["tokenizer"], demo["processor"], checkpoint)  # the model is re-exported
    with caplog.at_level(logging.INFO):
        predict_vqa(checkpoint, demo["parquet"], out, state_dir=state, batch_size=8, max_new_tokens=MAX_NEW_TOKENS)
    assert "setting aside the state" in caplog.text and f"inputs.{checkpoint}: '" in caplog.text
    assert "resuming" not in caplog.text
    assert _predictions(out) == _answer(demo, "trained", demo["questions"], tmp_path / "mem.jsonl", batch_size=8)
    assert not state.exists()


def test_partial_predictions_of_the_same_model_are_continued(demo, tmp_path, monkeypatch, caplog):
    checkpoint = save_demo_llava(demo["trained"], demo["tokenizer"], demo["processor"], tmp_path / "llava")
    out, state = tmp_path / "vqa" / "predictions.jsonl", tmp_path / "state" / "chunk-0"
    _killed_before_publishing(monkeypatch, checkpoint, demo["parquet"], out, state)
    with caplog.at_level(logging.INFO):
        predict_vqa(checkpoint, demo["parquet"], out, state_dir=state, batch_size=8, max_new_tokens=MAX_NEW_TOKENS)
    assert f"resuming, {len(demo['questions'])} answered, 0 to go" in caplog.text
    assert "setting aside" not in caplog.text
    assert _predictions(out) == _answer(demo, "trained", demo["questions"], tmp_path / "mem.jsonl", batch_size=8)


# --------------------------------------------------------------------------------------------------------------
# Images read ahead by loader workers; one job per model over every dataset, from a tower delta
# --------------------------------------------------------------------------------------------------------------


def test_images_read_by_loader_workers_give_the_same_answers(demo, tmp_path):
    here = _answer(demo, "untrained", demo["questions"], tmp_path / "here.jsonl", batch_size=4, num_workers=0)
    ahead = _answer(demo, "untrained", demo["questions"], tmp_path / "ahead.jsonl", batch_size=4, num_workers=2)
    assert ahead == here
    assert len({record["prediction"] for record in here}) > 3  # answers depend on the image and question


def test_an_unreadable_image_read_by_a_worker_names_its_question(demo, tmp_path):
    broken = demo["questions"].copy()
    broken.loc[broken.index[5], "image_path"] = str(tmp_path / "missing.png")
    with pytest.raises(QuestionTableError, match=f"question_id {broken['question_id'].iloc[5]}: cannot read image"):
        _answer(demo, "untrained", broken, tmp_path / "out.jsonl", batch_size=4, num_workers=2)


def _tiny_open_clip_for(tower_config: dict, seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=tower_config["projection_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=tower_config["num_hidden_layers"], width=tower_config["hidden_size"],
            head_width=tower_config["hidden_size"] // tower_config["num_attention_heads"],
            image_size=tower_config["image_size"], patch_size=tower_config["patch_size"],
            mlp_ratio=tower_config["intermediate_size"] / tower_config["hidden_size"]),
        text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
        quick_gelu=True,
    ).eval()


def test_one_job_loads_a_tower_delta_once_and_answers_every_dataset(demo, tmp_path, monkeypatch):
    from hnclip.llava import infer
    from hnclip.llava.tower_delta import export_tower_delta, write_full_checkpoint

    base = save_demo_llava(demo["untrained"], demo["tokenizer"], demo["processor"], tmp_path / "base")
    delta = tmp_path / "delta"
    export_tower_delta(base, _tiny_open_clip_for(TINY_TOWER, seed=3), delta)
    loads = []
    monkeypatch.setattr(infer, "load_llava_for_inference",
                        lambda *a, **k: loads.append(a) or load_llava_for_inference(*a, **k))
    parts = [infer.DatasetChunk(name, str(demo["parquet"]), str(tmp_path / f"{name}.jsonl"),
                                str(tmp_path / "state" / name), use_ocr=name == "textvqa")
             for name in ("vqav2", "textvqa")]
    infer.answer_chunk(checkpoint_dir=delta, datasets=parts, n_chunks=2, chunk=1, batch_size=4,
                       max_new_tokens=MAX_NEW_TOKENS, dtype="float32")
    assert len(loads) == 1
    chunk = chunk_questions(demo["questions"], 2, 1)
    full = write_full_checkpoint(delta, tmp_path / "full")["out_dir"]
    for part in parts:
        predictions = _predictions(Path(part.out_jsonl))
        assert [p["question_id"] for p in predictions] == chunk["question_id"].tolist()
        assert {p["use_ocr"] for p in predictions} == {part.use_ocr}
        reference = tmp_path / f"{part.dataset}-full.jsonl"
        predict_vqa(full, demo["parquet"], reference, batch_size=4, max_new_tokens=MAX_NEW_TOKENS,
                    use_ocr=part.use_ocr)
        expected = [p for p in _predictions(reference) if p["question_id"] in set(chunk["question_id"])]
        assert predictions == expected  # the assembled delta answers as its complete checkpoint does
        assert not Path(part.state_dir).exists()
