"""Tokenizers: a run's own (loaded, or a byte-level BPE trained with `tokenizers`), and the bytes each token
stands for."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase

from .loading import load_tokenizer

EOS = "<|endoftext|>"


def train_bpe(texts, vocab_size: int, max_documents: int) -> GPT2TokenizerFast:
    """A GPT-2-style byte-level BPE learnt from `texts`, with <|endoftext|> as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(islice(texts, max_documents), trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def run_tokenizer(cfg, accelerator, data) -> PreTrainedTokenizerBase:
    """A pretraining run's tokenizer: the one `data` names (cfg.tokenizer, or token shards' own), or with 'train'
    a byte-level BPE trained on data's training documents; saved in `<output_dir>/tokenizer` (a resumed run
    reuses it, never retrains)."""
    saved = Path(cfg.output_dir) / "tokenizer"
    if data.tokenizer_name != "train":
        tokenizer = load_tokenizer(data.tokenizer_name)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(saved)
    else:
        if accelerator.is_main_process and not (saved / "tokenizer.json").exists():
            train_bpe(data.texts(), cfg.tokenizer_vocab_size, cfg.tokenizer_train_documents).save_pretrained(saved)
        accelerator.wait_for_everyone()
        tokenizer = load_tokenizer(str(saved))
    return tokenizer


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
