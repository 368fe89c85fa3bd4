"""A word-level tokenizer with a character fallback for the demo LLaVA, built from the synthetic vocabulary.

The real pipeline uses LLaVA-1.5's Llama tokenizer; the demo needs something small with the same
special tokens and behaviour the inference code relies on: ``<s>`` prepended like Llama's BOS,
``</s>`` as end of answer, ``<pad>`` for left padding and ``<image>`` as one atomic token.

Every word of the training texts is one token. Any other word is spelled: its first character, then
``##``-prefixed continuation characters (WordPiece), and decoding joins them back. Sign text (OCR tokens,
TextVQA answers) is left out of the word list on purpose, so reading "DL" off the OCR line and answering
"dl", or its first character, is a copy of character tokens the model can learn from any sign, not a
lookup of a word it has to have seen. A sign that happens to spell a word of the list ("ON", "TO") stays
that one word, in the OCR line and in the answer alike.
"""

from __future__ import annotations

import os
import string
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hnclip.llava.prompt import IMAGE_TOKEN

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2 as in Llama; <pad> and <image> follow.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
CONTINUATION_PREFIX = "##"
# Characters every demo tokenizer can spell, whatever its corpus: what the synthetic signs may show.
SPELLABLE = string.ascii_lowercase + string.digits
DEMO_MODEL_MAX_LENGTH = 1024


class DemoTokenizerError(ValueError):
    """The texts given to train the demo tokenizer cannot produce a usable vocabulary."""


def _normalizer():
    # Lower-casing keeps the vocabulary small; VQA scoring lower-cases answers anyway.
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer():
    # Whitespace() splits on \w+|[^\w\s]+, so punctuation becomes its own token and newlines vanish:
    # the prompt's line structure carries no information a tiny model could use.
    return pre_tokenizers.Whitespace()


def _word_counts(texts: Iterable[str]) -> Counter:
    normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def demo_vocabulary(texts: Iterable[str]) -> dict[str, int]:
    """Token ids: the special tokens, the words of ``texts`` (most frequent first), then every character in
    both positions (word-initial and ``##`` continuation)."""
    counts = _word_counts(texts)
    if not counts:
        raise DemoTokenizerError("no words in the texts given to train the demo tokenizer")
    words = sorted(counts, key=lambda word: (-counts[word], word))
    characters = sorted(set(SPELLABLE) | {c for word in words for c in word})
    tokens = [*SPECIAL_TOKENS, *words, *characters, *(CONTINUATION_PREFIX + c for c in characters)]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def train_demo_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Build the demo tokenizer from ``texts`` (see the module docstring) and save it to ``out_dir``.

    Encoding with special tokens prepends ``<s>`` (like Llama's tokenizer, so prompts tokenize the same way
    in the demo and the real model); padding is on the left, as batched greedy decoding needs.
    """
    tokenizer = Tokenizer(models.WordPiece(demo_vocabulary(texts), unk_token=UNK_TOKEN,
                                           continuing_subword_prefix=CONTINUATION_PREFIX))
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
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
