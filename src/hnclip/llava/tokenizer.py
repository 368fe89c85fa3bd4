"""A word-level tokenizer for the demo LLaVA, trained on the synthetic vocabulary.

The real pipeline uses LLaVA-1.5's Llama tokenizer; the demo needs something small with the same
special tokens and behaviour the inference code relies on: ``<s>`` prepended like Llama's BOS,
``</s>`` as end of answer, ``<pad>`` for left padding and ``<image>`` as one atomic token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hnclip.llava.prompt import IMAGE_TOKEN

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2 as in Llama; <pad> and <image> follow.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
DEMO_MODEL_MAX_LENGTH = 1024


class DemoTokenizerError(ValueError):
    """The texts given to train the demo tokenizer cannot produce a usable vocabulary."""


def _untrained_word_level_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    # Lower-casing keeps the vocabulary small; VQA scoring lower-cases answers anyway.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Whitespace() splits on \w+|[^\w\s]+, so punctuation becomes its own token and newlines vanish:
    # the prompt's line structure carries no information a tiny model could use.
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def train_demo_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Train a lower-cased word-level tokenizer on ``texts`` and save it to ``out_dir``.

    Every word seen at least once gets an id. Encoding with special tokens prepends ``<s>``
    (like Llama's tokenizer, so prompts tokenize the same way in the demo and the real model);
    padding is on the left, as batched greedy decoding needs.
    """
    tokenizer = _untrained_word_level_tokenizer()
    trainer = trainers.WordLevelTrainer(vocab_size=1_000_000, min_frequency=1, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise DemoTokenizerError(f"no words in the texts given to train the demo tokenizer for {out_dir}")
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=DEMO_MODEL_MAX_LENGTH,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The id of ``<image>``; raises if the tokenizer does not know it as one token."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise KeyError(f"tokenizer {tokenizer.name_or_path!r} has no {IMAGE_TOKEN} token")
    return int(token_id)
