"""Encode captions at their own length instead of the model's context length.

CLIP's text tower is causal and pools at the end-of-text token, so the padding after that token never changes a
caption's feature. Encoding each length bucket trimmed to its longest caption gives the same features for a
fraction of the compute: HNC captions are ~12 tokens, a few logic captions ~25, the context 32 or 77.
"""

from __future__ import annotations

import contextlib

import torch
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch.nn.attention import SDPBackend, sdpa_kernel

BUCKET_EDGES = (16,)


def caption_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including end-of-text (CLIP's tokenizer gives it the highest id in each row)."""
    return tokens.argmax(dim=-1) + 1


def _encode_trimmed(model: CLIP, tokens: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
    """Features of trimmed token rows whose token embeddings are ``embedded`` (same rows, same length)."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embedded.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type)
    return x @ model.text_projection if not isinstance(model.text_projection, torch.nn.Linear) else \
        model.text_projection(x)


def encode_text_by_length(model, tokens: torch.Tensor, edges: tuple[int, ...] = BUCKET_EDGES) -> torch.Tensor:
    """``model.encode_text(tokens)``, computed per length bucket on trimmed token rows, on the model's device.

    Pass ``tokens`` on the CPU: the buckets are then found there, and the GPU never waits for the host to read
    lengths back (a device sync per step would stall the training loop's queue). Falls back to ``encode_text`` for
    towers this trick does not hold for (non-causal or non-argmax pooling, custom text towers).
    """
    device = next(model.parameters()).device
    if not isinstance(model, CLIP) or model.text_pool_type != "argmax" or model.attn_mask is None:
        return model.encode_text(tokens.to(device))
    tokens = tokens.cpu()
    lengths = caption_lengths(tokens)
    with _attention_without_cudnn(device):
        return _encode_buckets(model, tokens, lengths, edges, device)


def _attention_without_cudnn(device: torch.device):
    """cuDNN's attention plans per shape, and trimmed buckets change shape every step: on an H200 its backward took
    2.1 s of host time in 6 profiled steps of ViT-L-14-336 (torch.profiler) while the card idled. The other fused
    kernels take any shape without planning."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _encode_buckets(model, tokens, lengths, edges, device) -> torch.Tensor:
    # One embedding lookup for all rows: each lookup's backward writes a dense vocabulary-sized gradient, and one
    # per bucket took half of a tiny model's CPU step (torch.profiler).
    longest = int(lengths.max())
    embedded = model.token_embedding(tokens[:, :longest].to(device, non_blocking=True))
    features = None
    lower = 0
    for upper in (*edges, tokens.shape[1]):
        rows = torch.nonzero((lengths > lower) & (lengths <= upper)).flatten()
        lower = upper
        if rows.numel() == 0:
            continue
        length = int(lengths[rows].max())
        rows_on_device = rows.to(device, non_blocking=True)
        trimmed = tokens[rows, :length].to(device, non_blocking=True)
        encoded = _encode_trimmed(model, trimmed, embedded[rows_on_device, :length])
        if features is None:
            features = encoded.new_empty(tokens.shape[0], encoded.shape[-1])
        features = features.index_copy(0, rows_on_device, encoded)
    return features
