"""The model: a fresh `GPT2LMHeadModel`, and the attention mask that keeps packed documents apart."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """Round the embedding rows up (50257 -> 50304): matmuls with a multiple of 64 run faster on GPUs."""
    return -(-n // multiple) * multiple


def build_model(cfg, vocab_size: int, eos_token_id: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=cfg.vocab_size or padded_vocab_size(vocab_size),
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        loss_type="ForCausalLM",
    )
    config._attn_implementation = cfg.attn_implementation
    return GPT2LMHeadModel(config)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Every position 0 opens a new document: [[0,1,2,0,1]] -> [[0,0,0,1,1]]."""
    return (position_ids == 0).cumsum(dim=-1)


def document_causal_mask(position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """Causal attention restricted to each token's own document, in the form the attention kernel takes.

    Passed to the model explicitly rather than left to transformers' packed-sequence detection,
    which is switched off under torch.compile (it needs data-dependent control flow) and would
    then silently let documents attend to each other.
    """
    docs = document_ids(position_ids)
    batch, length = docs.shape
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (q >= kv) & (docs[b, q] == docs[b, kv])

        return create_block_mask(same_document_causal, batch, None, length, length, device=docs.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=docs.device).tril()
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal  # (batch, query, key)
    allowed = allowed[:, None]  # one mask for all heads
    if attn_implementation == "eager":  # eager attention adds the mask to the scores
        return torch.zeros(allowed.shape, dtype=dtype, device=docs.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed
