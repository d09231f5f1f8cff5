"""The model: a fresh `GPT2LMHeadModel`, the attention that keeps packed documents apart, and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# GPT-2 in transformers does not take flex attention. This registers it under its own name: packed
# batches get a document BlockMask (flash-speed kernels that skip masked blocks), passed as the
# `document_mask` keyword, which transformers hands through to the attention function untouched
# (GPT-2's forward treats `attention_mask` as a tensor). Anything else (generation, unpacked
# evaluation) falls back to sdpa with the masks transformers builds for it.
FLEX = "flex_document"


def _flex_document_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             document_mask=None, **kwargs):
    if document_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(query, key, value, block_mask=document_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLEX, _flex_document_attention)
AttentionMaskInterface.register(FLEX, sdpa_mask)


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
    )
    config._attn_implementation = attention_name(cfg.attn_implementation)
    return GPT2LMHeadModel(config)


def attention_name(choice: str) -> str:
    return FLEX if choice == "flex_attention" else choice


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Every position 0 opens a new document: [[0,1,2,0,1]] -> [[0,0,0,1,1]]."""
    return (position_ids == 0).cumsum(dim=-1)


def document_mask_inputs(position_ids: torch.Tensor, attn_implementation: str) -> dict:
    """The model keyword that keeps packed documents apart: `document_mask` (flex) or `attention_mask`."""
    mask = document_causal_mask(position_ids, attn_implementation, torch.float32)
    return {"document_mask" if attention_name(attn_implementation) == FLEX else "attention_mask": mask}


def document_causal_mask(position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """Causal attention restricted to each token's own document, in the form the attention kernel takes.

    Passed to the model explicitly rather than left to transformers' packed-sequence detection,
    which is switched off under torch.compile (it needs data-dependent control flow) and would
    then silently let documents attend to each other.
    """
    docs = document_ids(position_ids)
    batch, length = docs.shape
    if attention_name(attn_implementation) == FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (q >= kv) & (docs[b, q] == docs[b, kv])

        return create_block_mask(same_document_causal, batch, None, length, length, device=docs.device,
                                 _compile=docs.is_cuda)
    causal = torch.ones(length, length, dtype=torch.bool, device=docs.device).tril()
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal  # (batch, query, key)
    allowed = allowed[:, None]  # one mask for all heads
    if attn_implementation == "eager":  # eager attention adds the mask to the scores
        return torch.zeros(allowed.shape, dtype=dtype, device=docs.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def causal_lm_loss(model, inputs: dict, num_items_in_batch, fused: bool) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's targets, divided by `num_items_in_batch`.

    fused=False is transformers' own loss. fused=True never materialises the (tokens x 50k) logits:
    the model returns its final hidden states (logits for one position only), and Liger's fused
    linear + cross-entropy kernel computes the loss chunk by chunk on the GPU. The call still goes
    through the (possibly DDP-wrapped) model, so gradient synchronisation is unchanged.
    """
    if not fused:
        return model(**inputs, num_items_in_batch=num_items_in_batch).loss
    labels = inputs["labels"]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = model(**rest, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    head = _unwrap(model).get_output_embeddings()
    hidden, targets = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    return fused_linear_cross_entropy(hidden, head.weight, targets) / num_items_in_batch


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if hidden.is_cuda:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)
    # Reference path (CPU): the same sum, materialising the logits.
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100, reduction="sum")


def _unwrap(model):
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
