"""Benchmark batched LLaVA VQA inference: questions/s at batch B vs batch 1, and the share of identical answers.

Default: a demo-sized LLaVA (tiny CLIP tower, tiny Llama) trained for a few steps on toy questions written to a
temporary directory, float32. ``--real-size``: a randomly initialised LLaVA-1.5-7B-shaped model (Llama 4096 x 32,
ViT-L/14 at 336 px) in bfloat16, only meaningful on a GPU (``--device cuda``).

    python bench/vqa_infer.py                       # CPU, demo model; target >= 4x with 100 % identical answers
    python bench/vqa_infer.py --device cuda --real-size --n-questions 64 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from hnclip.llava.demo_model import build_demo_llava, demo_image_processor, write_toy_vqa_questions
from hnclip.llava.infer import answer_questions, read_completed_predictions
from hnclip.llava.pretrain import pretrain_demo_llava, tokenizer_training_texts
from hnclip.llava.prompt import num_image_tokens
from hnclip.llava.tokenizer import image_token_id, train_demo_tokenizer

DEMO_TOWER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=64, hidden_act="quick_gelu")
# openai/clip-vit-large-patch14-336 and vicuna-7b-v1.5 as in llava-hf/llava-1.5-7b-hf (vocab incl. added tokens).
REAL_TOWER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
REAL_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--real-size", action="store_true", help="LLaVA-1.5-7B shapes, random init, bf16")
    parser.add_argument("--n-questions", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 8 (demo), 16 (real size)")
    parser.add_argument("--train-steps", type=int, default=60, help="demo model training steps before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def build_real_size_llava(tokenizer, device: str) -> LlavaForConditionalGeneration:
    """Random LLaVA-1.5-7B-shaped model, allocated directly in bf16 on ``device`` (28 GB would not fit as fp32)."""
    vision = CLIPVisionConfig(**REAL_TOWER)
    text = LlamaConfig(**REAL_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id(tokenizer),
                         image_seq_length=num_image_tokens(vision), projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def prepare(args: argparse.Namespace, workdir: Path):
    """Toy questions, tokenizer, model and image processor for the chosen size."""
    n_images = max(4, args.n_questions // 3)
    questions = write_toy_vqa_questions(workdir / "images", n_images=n_images, seed=0).iloc[: args.n_questions]
    parquet = workdir / "questions.parquet"
    questions.to_parquet(parquet)
    texts = list(tokenizer_training_texts(questions))
    tokenizer = train_demo_tokenizer(texts, workdir / "tokenizer")
    if args.real_size:
        # Filler words bring the vocabulary to Llama's size, so every id a random model emits decodes to a word
        # and the identical-answer comparison sees every token.
        filler = [f"w{i:05d}" for i in range(REAL_TEXT["vocab_size"] - len(tokenizer))]
        tokenizer = train_demo_tokenizer(texts + filler, workdir / "tokenizer")
        model = build_real_size_llava(tokenizer, args.device)
        processor = demo_image_processor(model.config.vision_config)
        return questions, tokenizer, model, processor
    vision = CLIPVisionConfig(**DEMO_TOWER)
    torch.manual_seed(0)
    model = build_demo_llava(vision, tokenizer, seed=0)
    processor = demo_image_processor(vision)
    if args.train_steps > 0:
        pretrain_demo_llava(model, tokenizer, processor, [parquet], steps=args.train_steps, lr=3e-3,
                            batch_size=16, seed=0, log_path=workdir / "train_log.csv")
    return questions, tokenizer, model.to(args.device), processor


def timed_run(model, tokenizer, processor, questions, out: Path, batch_size: int, max_new_tokens: int) -> float:
    started = time.perf_counter()
    answer_questions(model, tokenizer, processor, questions, out, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    max_new_tokens = args.max_new_tokens or (16 if args.real_size else 8)
    with tempfile.TemporaryDirectory(prefix="vqa_bench_") as tmp:
        workdir = Path(tmp)
        questions, tokenizer, model, processor = prepare(args, workdir)
        # Warm-up (allocator, kernels, lazy imports) on a few questions outside the timing.
        timed_run(model, tokenizer, processor, questions.iloc[:2], workdir / "warmup.jsonl", 2, 2)
        seconds = {}
        for batch_size in (1, args.batch_size):
            seconds[batch_size] = timed_run(model, tokenizer, processor, questions, workdir / f"b{batch_size}.jsonl",
                                            batch_size, max_new_tokens)
        single = read_completed_predictions(workdir / "b1.jsonl")
        batched = read_completed_predictions(workdir / f"b{args.batch_size}.jsonl")
    identical = sum(single[q]["prediction"] == batched[q]["prediction"] for q in single)
    n = len(questions)
    figures = {
        "model": "real-size (LLaVA-1.5-7B shapes, random)" if args.real_size else "demo",
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": args.device,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": args.threads,
        "n_questions": n,
        "max_new_tokens": max_new_tokens,
        "questions_per_s_batch_1": n / seconds[1],
        f"questions_per_s_batch_{args.batch_size}": n / seconds[args.batch_size],
        "speedup": seconds[1] / seconds[args.batch_size],
        "identical_answers": identical,
        "identical_share": identical / n,
        "distinct_answers": len({record["prediction"] for record in single.values()}),
    }
    print(f"{figures['model']}: {figures['parameters'] / 1e6:.2f} M parameters, {args.device}, {figures['dtype']}, "
          f"{args.threads} thread(s), {n} questions, max_new_tokens {max_new_tokens}")
    print(f"{'batch':>6} {'q/s':>9} {'seconds':>9}")
    for batch_size in (1, args.batch_size):
        print(f"{batch_size:>6} {n / seconds[batch_size]:>9.2f} {seconds[batch_size]:>9.2f}")
    print(f"speed-up batch {args.batch_size} vs 1: {figures['speedup']:.2f}x; identical answers: {identical}/{n} "
          f"({100 * identical / n:.1f} %); {figures['distinct_answers']} distinct answers")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
