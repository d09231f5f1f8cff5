"""Evaluation helpers shared by the training loop and scripts/compare.py."""

from __future__ import annotations

import torch


def token_byte_lengths(tokenizer, size: int | None = None) -> torch.Tensor:
    """UTF-8 byte length of every token id, for bits-per-byte.

    Byte-level BPE (GPT-2's and ours) spells each byte as one character of its alphabet, so the
    length of the token string is its byte count. Special tokens stand for no text: 0 bytes.
    `size` pads the table to a model's (possibly larger, padded) vocabulary.
    """
    size = max(size or 0, len(tokenizer))
    lengths = torch.zeros(size, dtype=torch.long)
    special = set(tokenizer.all_special_ids)
    for token, idx in tokenizer.get_vocab().items():
        if idx not in special:
            lengths[idx] = len(token)
    return lengths
