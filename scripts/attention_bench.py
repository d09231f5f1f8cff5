"""Attention kernels for packed documents on one GPU: forward + backward time of one layer's attention,
and each kernel's error against PyTorch's variable-length flash kernel (FA2). Prints one line a kernel.

    python scripts/attention_bench.py --micro_batch_size 32 --block_size 1024

`causal, no documents` is what the hand-written reference (scripts/reference_gpt2.py) runs: the same
batch with the causal triangle only, so it does more work than document masking needs.

Two more rows where their packages are installed (neither is a requirement): cuDNN's packed-document (THD)
kernel through `nvidia-cudnn-frontend`'s torch ops, and FA4 (`flash-attn-4`) as `varlen_kernel: fa4` runs it
(hf_gpt/fa4.py's custom ops).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_gpt import fa4  # noqa: E402
from hf_gpt.config import first_line  # noqa: E402
from hf_gpt.model import VARLEN_CAUSAL  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro_batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--mean_document_tokens", type=int, default=700)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: the attention benchmark needs a GPU\n")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.attention.varlen import varlen_attn

    B, T, H, D = args.micro_batch_size, args.block_size, args.n_head, args.head_dim
    g = torch.Generator().manual_seed(0)
    starts = torch.rand(B, T, generator=g) < 1 / args.mean_document_tokens
    starts[:, 0] = True  # every row starts a document, as in the engine's batches
    offsets = starts.flatten().nonzero().flatten()
    cu = torch.cat([offsets, torch.tensor([B * T])]).to(torch.int32).cuda()
    docs = starts.cumsum(dim=1).cuda()
    print(f"{B} x {T} tokens, {len(cu) - 1} documents, {H} heads of {D}")
    # q, k and v as views of one (tokens, 3, heads, dim) projection, as GPT-2's are; each kernel takes them so.
    qkv0 = torch.randn(B * T, 3, H, D, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(B * T, H, D, device="cuda", dtype=torch.bfloat16)
    scale = D ** -0.5

    def rows(t):  # (B*T, H, D) -> (B, H, T, D)
        return t.view(B, T, H, D).transpose(1, 2)

    def unrows(t):
        return t.transpose(1, 2).reshape(B * T, H, D)

    def fa2_varlen(qkv):
        return varlen_attn(*qkv.unbind(1), cu, cu, T, T, scale=scale, **VARLEN_CAUSAL)

    block_mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (docs[b, qi] == docs[b, ki]), B, None, T, T)
    flex = torch.compile(flex_attention)

    def flex_blockmask(qkv):
        return unrows(flex(*map(rows, qkv.unbind(1)), block_mask=block_mask, scale=scale))

    dense = ((docs[:, :, None] == docs[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device="cuda").tril())[:, None]

    def sdpa_dense_mask(qkv):
        return unrows(F.scaled_dot_product_attention(*map(rows, qkv.unbind(1)), attn_mask=dense, scale=scale))

    def causal_no_documents(qkv):
        return unrows(F.scaled_dot_product_attention(*map(rows, qkv.unbind(1)), is_causal=True, scale=scale))

    def nested_jagged(qkv):
        nested = [torch.nested.nested_tensor_from_jagged(t, cu.long()).transpose(1, 2) for t in qkv.unbind(1)]
        return F.scaled_dot_product_attention(*nested, is_causal=True, scale=scale).transpose(1, 2).values()

    def run(fn):
        qkv = qkv0.clone().requires_grad_()
        out = fn(qkv)
        out.backward(grad)
        return [out.detach().float(), *qkv.grad.float().unbind(1)]

    def time_ms(fn, repeats=20):
        qkv = qkv0.clone().requires_grad_()
        for _ in range(3):
            fn(qkv).backward(grad)
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(qkv).backward(grad)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        return sorted(times)[repeats // 2]

    def cudnn_thd(qkv):
        import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd, differentiable)

        return torch.ops.cudnn.sdpa_fwd(*qkv.unbind(1), scale, is_causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                        max_seqlen_q=T, max_seqlen_kv=T, return_lse=True)[0]

    def fa4_varlen(qkv):
        return fa4.varlen_attention(qkv, cu, T, scale)

    kernels = [("FA2 varlen", fa2_varlen), ("flex + BlockMask", flex_blockmask),
               ("sdpa + dense mask", sdpa_dense_mask), ("nested (jagged) sdpa", nested_jagged),
               ("causal, no documents", causal_no_documents)]
    if importlib.util.find_spec("cudnn"):
        kernels.append(("cuDNN THD (frontend)", cudnn_thd))
    if not fa4.unavailable(torch.device("cuda")):
        kernels.append(("FA4 varlen", fa4_varlen))
    reference = run(fa2_varlen)
    for name, fn in kernels:
        try:
            errors = [((a - b).norm() / b.norm()).item() for a, b in zip(run(fn), reference)]
            print(f"{name:22} {time_ms(fn):7.3f} ms fwd+bwd   error out/dq/dk/dv vs FA2 varlen: "
                  + " ".join(f"{e:.1e}" for e in errors))
        except Exception as e:  # a kernel this torch cannot run for these inputs
            print(f"{name:22} failed: {first_line(e)[:200]}")


if __name__ == "__main__":
    main()
