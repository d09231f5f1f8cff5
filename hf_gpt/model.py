"""The model: a fresh `GPT2LMHeadModel`, the attention that keeps packed documents apart, and the loss."""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from . import fa4
from .config import UserError

# One attention function, registered with transformers under its own name, for every choice but
# eager. It takes packed documents in whichever form the chosen kernel needs, passed as model
# keywords that transformers hands through to the attention function untouched:
# - `cu_seq_lens_q`/`max_length_q` (transformers' names for packed sequences): the documents' bounds,
#   for PyTorch's variable-length flash kernel, which computes each document's causal triangle and
#   nothing else ("varlen");
# - `document_mask`: a flex-attention BlockMask, whose kernel skips fully masked blocks;
# - neither: sdpa, given `is_causal=True` whenever there is no padding. transformers itself builds a
#   dense (batch, 1, T, T) mask under torch.compile, and from position ids that look packed, and sdpa
#   then runs kernels that skip no causal tiles: 2.3x the attention time on an H100 (torch.profiler).
PACKED = "hf_gpt_packed"
NO_ATTENTION_DROPOUT = "varlen and flex attention have no attention dropout: set dropout 0 or use sdpa"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
               max_length_q=None, document_mask=None, **kwargs):
    if (cu_seq_lens_q is not None or document_mask is not None) and dropout:
        raise ValueError(NO_ATTENTION_DROPOUT)
    if cu_seq_lens_q is not None:  # a GPT-2 without QKVAttention (see below): q, k and v stacked, a copy
        qkv = torch.stack([t.transpose(1, 2) for t in (query, key, value)], dim=2)
        return varlen_attention(qkv, cu_seq_lens_q, max_length_q, scaling), None
    if document_mask is not None:
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(query, key, value, block_mask=document_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _causal_mask(*args, attention_mask=None, **kwargs):
    """No mask at all when nothing is padded and the queries are the keys (no cache): sdpa then runs with
    is_causal=True. transformers builds a dense mask there under torch.compile, and another from position
    ids that look packed; packed documents reach this attention as explicit keywords instead (see
    document_mask_inputs), so that detection is not needed."""
    if attention_mask is None and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED, _attention)
AttentionMaskInterface.register(PACKED, _causal_mask)


def varlen_attention(qkv, cu_seq_lens, max_length: int, scaling=None) -> torch.Tensor:
    """Causal attention within each document of a packed batch: queries, keys and values stacked as (batch, T, 3,
    heads, dim) in — GPT-2's qkv projection, viewed so — and (batch, T, heads, dim) out. `cu_seq_lens` holds
    the documents' start offsets in the flattened batch, then its length.

    On a GPU, FA4 or PyTorch's variable-length flash kernel (torch >= 2.10). Elsewhere the same function through
    sdpa with the block-diagonal causal mask the bounds describe, so CPU tests run this path too.
    """
    batch, length, _, heads, dim = qkv.shape
    if not qkv.is_cuda:
        starts = torch.zeros(batch * length, dtype=torch.long, device=qkv.device)
        starts[cu_seq_lens[:-1].long()] = 1
        doc = starts.cumsum(0).view(batch, 1, length)
        allowed = (doc.transpose(1, 2) == doc).tril()  # (batch, T, T); every row starts a document
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling)
        return out.transpose(1, 2)
    from torch.nn.attention.varlen import varlen_attn

    packed = qkv.flatten(0, 1)  # (batch * T, 3, heads, dim): a view
    if _varlen_kernel == "fa4":
        out = fa4.varlen_attention(packed, cu_seq_lens, max_length, dim ** -0.5 if scaling is None else scaling)
    else:
        out = varlen_attn(*packed.unbind(1), cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling,
                          **VARLEN_CAUSAL)
    return out.view(batch, length, heads, dim)


class QKVAttention(GPT2Attention):
    """GPT-2's attention, which gives varlen's kernel (packed documents: `cu_seq_lens_q`) the qkv projection whole.

    transformers splits c_attn's (batch, T, 3 x embd) output into q, k and v before any attention function sees
    them, and autograd then concatenates their three gradients back into one: a copy of the projection's size
    in every layer. Given the projection, FA4's backward writes the three side by side (fa4.py). Without packed
    documents this is GPT-2's own forward. Only the class differs: the same modules and state dict. Packed
    documents are whole sequences, so nothing goes into a cache.
    """

    def forward(self, hidden_states, *args, cu_seq_lens_q=None, max_length_q=None, **kwargs):
        if cu_seq_lens_q is None:
            return super().forward(hidden_states, *args, **kwargs)
        if self.training and self.attn_dropout.p:
            raise ValueError(NO_ATTENTION_DROPOUT)
        batch, length, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        out = varlen_attention(qkv, cu_seq_lens_q, max_length_q, self.scaling)
        return self.resid_dropout(self.c_proj(out.reshape(batch, length, -1))), None


def qkv_attention(model) -> None:
    """Every self-attention `GPT2Attention` of `model` made a `QKVAttention`, in place, for training on varlen."""
    for module in model.modules():
        if type(module) is GPT2Attention and not module.is_cross_attention:
            module.__class__ = QKVAttention


_varlen_kernel = "torch"  # the process's kernel for varlen on a GPU; see use_varlen_kernel
VARLEN_KERNEL_NAMES = {"torch": "PyTorch's FlashAttention-2 kernel", "fa4": "FA4 (flash-attn-4)"}


def use_varlen_kernel(choice: str, device: torch.device) -> str:
    """Run varlen on `choice`'s kernel ("torch", "fa4" or "auto": fa4 where it runs), in this process from
    now on; returns the kernel chosen. A kernel belongs to the installed packages and the GPU, not to
    one model, so it is the process's setting, as the attention functions registered above are."""
    global _varlen_kernel
    why_not = fa4.unavailable(device) if choice != "torch" else "not chosen"
    if choice == "fa4" and why_not:
        raise UserError(f"varlen_kernel fa4: {why_not}")
    _varlen_kernel = "torch" if why_not else "fa4"
    return _varlen_kernel


def varlen_kernel() -> str:
    """The kernel varlen runs on a GPU in this process: "torch" or "fa4"."""
    return _varlen_kernel


def _causal_keyword() -> dict:
    # varlen_attn says "causal" as the window (-1, 0) where it takes a window (torch 2.11 on), else is_causal.
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10: no varlen attention on any device
        return {}
    return {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters else {"is_causal": True}


VARLEN_CAUSAL = _causal_keyword()  # also scripts/attention_bench.py's


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """Round the embedding rows up (50257 -> 50304): matmuls with a multiple of 64 run faster on GPUs."""
    return -(-n // multiple) * multiple


def parameter_count(cfg, vocab_size: int) -> int:
    """GPT-2's parameters at cfg's shape: embeddings (tokens and positions), per layer attention (4 E^2 + 4 E)
    and MLP (8 E^2 + 5 E) and two LayerNorms (4 E), the final LayerNorm, and an untied head."""
    e = cfg.n_embd
    vocab = cfg.vocab_size or padded_vocab_size(vocab_size)
    head = 0 if cfg.tie_word_embeddings else vocab * e
    return vocab * e + cfg.block_size * e + cfg.n_layer * (12 * e * e + 13 * e) + 2 * e + head


def training_memory(cfg, vocab_size: int) -> int:
    """Bytes a training run of cfg's model needs at least: float32 weights, gradients and AdamW's two moments
    (16 bytes a parameter), and the activations of one micro-batch: 34 bytes a token and unit of width per
    layer in 16-bit precision (Korthikanti et al. 2022, without the attention scores an sdpa kernel never
    stores; twice that in float32), and the logits with their gradient unless fused. A lower bound, so that a
    refusal is certain: allocator slack, the CUDA context and compiled kernels come on top."""
    tokens = cfg.micro_batch_size * cfg.block_size
    vocab = cfg.vocab_size or padded_vocab_size(vocab_size)
    width = 4 if cfg.mixed_precision == "no" else 2  # '' is accelerate's config: maybe 16-bit
    logits = 0 if cfg.fused_cross_entropy else 2 * width * vocab
    return 16 * parameter_count(cfg, vocab_size) + tokens * (17 * width * cfg.n_layer * cfg.n_embd + logits)


def machine_memory() -> tuple[int, str]:
    """(bytes, what): the GPU's memory where CUDA is, else the host's RAM (0 where neither can be read)."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}'s memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (AttributeError, ValueError, OSError):
        return 0, ""


def check_shape(cfg, vocab_size: int) -> None:
    """A model that cannot be built, or cannot train on this machine, is refused before it is built: a
    --block_size of 100000000 would otherwise build 19 billion parameters and swap for minutes."""
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head} (each head gets n_embd / "
                        f"n_head dimensions): choose e.g. --n_embd {-(-cfg.n_embd // cfg.n_head) * cfg.n_head}")
    if cfg.vocab_size and vocab_size and cfg.vocab_size < vocab_size:
        raise UserError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens: raise it, "
                        "or set 0 (the tokenizer's size rounded up to a multiple of 64)")
    need = training_memory(cfg, vocab_size)
    have, where = machine_memory()
    if have and need > have:
        raise UserError(f"the model ({parameter_count(cfg, vocab_size):,} parameters at block_size {cfg.block_size}, "
                        f"n_embd {cfg.n_embd}, n_layer {cfg.n_layer}) needs about {need / 2**30:,.1f} GiB to train "
                        f"at micro_batch_size {cfg.micro_batch_size}, more than {where} ({have / 2**30:,.1f} GiB); "
                        "make it smaller")


def build_model(cfg, vocab_size: int, eos_token_id: int) -> GPT2LMHeadModel:
    check_shape(cfg, vocab_size)
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
    model = GPT2LMHeadModel(config)
    if not cfg.qkv_bias:
        # GPT2Config has no switch for it (c_attn is one Conv1D with a bias): a bias fixed at zero computes what
        # none would, and the saved model stays one that plain transformers loads. Frozen, so no optimizer,
        # weight decay or clipping ever sees it.
        for block in model.transformer.h:
            block.attn.c_attn.bias.data.zero_()
            block.attn.c_attn.bias.requires_grad_(False)
    return model


def attention_name(choice: str) -> str:
    """The attention transformers runs for a config's `attn_implementation` (see PACKED above)."""
    return "eager" if choice == "eager" else PACKED


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Every position 0 opens a new document: [[0,1,2,0,1]] -> [[0,0,0,1,1]]."""
    return (position_ids == 0).cumsum(dim=-1)


def document_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """Where each document starts in the flattened batch, then its length (int32, flash's `cu_seqlens`).
    Every row starts at position 0, so rows are bounds too: [[0,1,2,0],[0,1,0,1]] -> [0,3,4,6,8]."""
    flat = position_ids.flatten()
    starts = (flat == 0).nonzero().flatten()
    return torch.cat([starts, starts.new_full((1,), flat.numel())]).to(torch.int32)


def document_mask_inputs(position_ids: torch.Tensor, attn_implementation: str, device=None) -> dict:
    """The model keywords that keep packed documents apart, on `device`: `cu_seq_lens_q` and co. (varlen),
    `document_mask` (flex) or `attention_mask` (sdpa, eager)."""
    device = torch.device(device) if device is not None else position_ids.device
    if attn_implementation == "varlen":
        # Found on the host before the batch moves: on the GPU, nonzero() would wait for its queue.
        bounds = document_bounds(position_ids.cpu())
        bounds = (bounds.pin_memory() if device.type == "cuda" else bounds).to(device, non_blocking=True)
        # Batches hold different numbers of documents: one compiled graph for all of them, not one each.
        torch._dynamo.maybe_mark_dynamic(bounds, 0)
        length = position_ids.shape[-1]
        return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": length, "max_length_k": length}
    mask = document_causal_mask(position_ids.to(device), attn_implementation, torch.float32)
    return {"document_mask" if attn_implementation == "flex_attention" else "attention_mask": mask}


def document_causal_mask(position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """Causal attention restricted to each token's own document, as a flex BlockMask or a dense mask.

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
    # use_cache=False: GPT-2 otherwise fills a KV cache in training too, copying every layer's keys and
    # values (and zero-filling their gradients) for nothing: 6% of an H100 step (torch.profiler).
    if not fused:
        return model(**inputs, num_items_in_batch=num_items_in_batch, use_cache=False).loss
    labels = inputs["labels"]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = model(**rest, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]
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
