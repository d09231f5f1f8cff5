"""FA4 — flash-attn-4's CuTe DSL kernels for Hopper and Blackwell — for packed documents, as PyTorch custom ops.

`attn_implementation: varlen` runs PyTorch's variable-length kernel (FlashAttention-2) where FA4 cannot. On
an H100, FA4's kernels take GPT-2 124M with document masking from 0.94 of the hand-written reference's speed
to 1.01 (with model.QKVAttention; docs/results/throughput.md), with the same error against float32.
flash-attn-4 ships its kernels as an autograd Function that torch.compile cannot trace, so its forward and
backward are wrapped here as custom ops, each with a shape-only fake: a compiled model then holds them as two
opaque kernels, one graph for every number of documents. `pip install flash-attn-4` (4.0.0b36 tested) and `--varlen_kernel fa4` (or `auto`).
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
from torch import Tensor

from .config import first_line

TESTED = "4.0.0b36"


def kernels():
    """flash-attn-4's forward and backward; its public function is the autograd Function we cannot compile."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    return _flash_attn_fwd, _flash_attn_bwd


def unavailable(device: torch.device) -> str | None:
    """Why FA4 cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"FA4 runs on NVIDIA GPUs, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"FA4 needs a Hopper or Blackwell GPU; this {torch.cuda.get_device_name(device)} is sm_{major}{minor}"
    if importlib.util.find_spec("flash_attn") is None:
        return f"flash-attn-4 is not installed (pip install flash-attn-4=={TESTED})"
    try:
        forward, backward = kernels()
    except Exception as e:  # flash-attn 2 has no cute kernels; a broken CUTLASS DSL install fails here too
        return f"flash-attn-4 does not load: {first_line(e)}"
    # The early FA4 bundled with flash-attn 2.8 has these functions with other arguments.
    if "return_lse" not in inspect.signature(forward).parameters or "dq" not in inspect.signature(backward).parameters:
        return f"this flash_attn.cute is not flash-attn-4's (pip install flash-attn-4=={TESTED})"
    return None


@torch.library.custom_op("hf_gpt::fa4_varlen_forward", mutates_args=())
def varlen_forward(qkv: Tensor, cu_seq_lens: Tensor, max_length: int, scale: float) -> tuple[Tensor, Tensor]:
    forward, _ = kernels()
    # return_lse: the backward needs it, and inside a custom op no input requires grad to say so.
    out, lse, *_ = forward(*qkv.unbind(1), cu_seqlens_q=cu_seq_lens, cu_seqlens_k=cu_seq_lens,
                           max_seqlen_q=max_length, max_seqlen_k=max_length, softmax_scale=scale, causal=True,
                           return_lse=True)
    return out, lse


@varlen_forward.register_fake
def _(qkv, cu_seq_lens, max_length, scale):
    # out: (tokens, heads, dim), contiguous; lse: (heads, tokens), float32 — FA4's layouts for packed input.
    tokens, _, heads, dim = qkv.shape
    return qkv.new_empty((tokens, heads, dim)), qkv.new_empty((heads, tokens), dtype=torch.float32)


@torch.library.custom_op("hf_gpt::fa4_varlen_backward", mutates_args=())
def varlen_backward(grad: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seq_lens: Tensor, max_length: int,
                    scale: float) -> Tensor:
    _, backward = kernels()
    # q, k and v's gradients written side by side into one buffer of qkv's layout, which the qkv projection's
    # backward takes as it is: three separate gradients would be concatenated into it, a copy of the whole
    # projection's size in every layer (1.2 ms of a 68 ms H100 step, torch.profiler).
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = dqkv.unbind(1)
    backward(*qkv.unbind(1), out, grad.contiguous(), lse, scale, True, cu_seqlens_q=cu_seq_lens,
             cu_seqlens_k=cu_seq_lens, max_seqlen_q=max_length, max_seqlen_k=max_length, dq=dq, dk=dk, dv=dv)
    return dqkv


@varlen_backward.register_fake
def _(grad, qkv, out, lse, cu_seq_lens, max_length, scale):
    return qkv.new_empty(qkv.shape)


def _save(ctx, inputs, output):
    qkv, cu_seq_lens, max_length, scale = inputs
    ctx.save_for_backward(qkv, *output, cu_seq_lens)
    ctx.max_length, ctx.scale = max_length, scale


def _backward(ctx, grad, _grad_lse):
    qkv, out, lse, cu_seq_lens = ctx.saved_tensors
    return varlen_backward(grad, qkv, out, lse, cu_seq_lens, ctx.max_length, ctx.scale), None, None, None


varlen_forward.register_autograd(_backward, setup_context=_save)


def varlen_attention(qkv: Tensor, cu_seq_lens: Tensor, max_length: int, scale: float) -> Tensor:
    """Causal attention within each packed document: q, k and v stacked as (tokens, 3, heads, dim) in — GPT-2's
    qkv projection, viewed so — and (tokens, heads, dim) out."""
    return varlen_forward(qkv, cu_seq_lens, max_length, scale)[0]
