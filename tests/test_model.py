import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gpt.model import attention_name, document_bounds, document_causal_mask, document_mask_inputs


def fa4_unavailable():
    from hf_gpt import fa4

    return fa4.unavailable(torch.device("cuda")) if torch.cuda.is_available() else "no GPU"


def tiny_gpt2(attn_implementation: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    config._attn_implementation = attention_name(attn_implementation)
    return GPT2LMHeadModel(config).eval()


def packed_and_separate(model, impl, compile_backend=None):
    docs = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 5)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    forward = torch.compile(model, backend=compile_backend, fullgraph=False) if compile_backend else model
    with torch.no_grad():
        packed = forward(input_ids=ids, position_ids=pos, **document_mask_inputs(pos, impl)).logits[0]
        separate = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    return packed, separate


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention", "varlen"])
def test_packed_documents_match_separate_documents(impl):
    packed, separate = packed_and_separate(tiny_gpt2(impl), impl)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_qkv_attention_trains_packed_documents_as_gpt2_attention(compiled, tmp_path):
    """QKVAttention (the training path for varlen) computes GPT-2's attention over packed documents: the same
    loss and gradients as transformers' own GPT2Attention through our attention function, compiled too;
    without documents it is GPT-2's forward; the model saves as a plain GPT-2."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    from hf_gpt.model import QKVAttention, qkv_attention

    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([list(range(5)) + list(range(11)), list(range(9)) + list(range(7))])
    runs = []
    for fused in (False, True):
        model = tiny_gpt2("varlen").train()  # dropout 0.1 in the residuals: seeded alike below
        model.config.attn_pdrop = 0.0
        for block in model.transformer.h:
            block.attn.attn_dropout.p = 0.0
        if fused:
            qkv_attention(model)
            assert all(type(block.attn) is QKVAttention for block in model.transformer.h)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(1)
        loss = forward(input_ids=ids, position_ids=pos, labels=ids, **document_mask_inputs(pos, "varlen")).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, msg=name)

    model.eval()
    with torch.no_grad():
        unpacked = model(input_ids=ids).logits  # no documents: GPT-2's own attention
        model.save_pretrained(tmp_path)
        plain = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        assert type(plain.transformer.h[0].attn) is GPT2Attention
        torch.testing.assert_close(plain(input_ids=ids).logits, unpacked)


def test_without_the_mask_documents_would_leak():
    model = tiny_gpt2("sdpa")
    docs = torch.randint(1, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(10), torch.arange(10)])[None]
    with torch.no_grad():
        plain = model(input_ids=docs, position_ids=pos, attention_mask=torch.ones(1, 20, dtype=torch.long)).logits
        masked = model(input_ids=docs, position_ids=pos,
                       attention_mask=document_causal_mask(pos, "sdpa", torch.float32)).logits
    assert not torch.allclose(plain[0, 10:], masked[0, 10:], atol=1e-4)  # the second document saw the first


def test_document_bounds_count_every_row_start():
    pos = torch.tensor([[0, 1, 2, 0], [0, 1, 0, 1]])
    assert document_bounds(pos).tolist() == [0, 3, 4, 6, 8]
    assert document_bounds(pos).dtype == torch.int32  # what flash kernels take


def test_varlen_keeps_rows_of_a_batch_apart():
    """Two rows, documents cut at row ends: each row's tokens see their own row's documents only."""
    model = tiny_gpt2("varlen")
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, **document_mask_inputs(pos, "varlen")).logits
        rows = [model(input_ids=ids[r:r + 1, a:b], position_ids=pos[r:r + 1, a:b]).logits[0]
                for r, a, b in ((0, 0, 5), (0, 5, 12), (1, 0, 12))]
    torch.testing.assert_close(packed.flatten(0, 1), torch.cat(rows), atol=1e-5, rtol=1e-5)


def test_compiled_causal_attention_gets_no_dense_mask(monkeypatch):
    """Under torch.compile, or without a KV cache and with position ids that look packed, transformers builds
    a dense (B, 1, T, T) mask, and sdpa then computes every masked tile; with nothing padded our attention
    gets no mask, so sdpa runs is_causal=True."""
    import hf_gpt.model as m

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    sdpa = m.sdpa_attention_forward
    monkeypatch.setattr(m, "sdpa_attention_forward", spy)
    model = tiny_gpt2("sdpa")
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
        # position ids that restart look packed to transformers, which would build a dense mask from them
        positions = torch.arange(16).repeat(2, 1) % 8
        model(input_ids=ids, position_ids=positions, use_cache=False)
        reference = model(input_ids=ids, use_cache=False).logits
    assert len(seen) == 3 * 2 and all(mask is None for mask in seen)
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-5)
    # the reference for causality itself: a prefix alone gives the same logits
    torch.testing.assert_close(model(input_ids=ids[:, :9]).logits, reference[:, :9], atol=1e-5, rtol=1e-5)


def test_mask_survives_torch_compile():
    """transformers drops its own packed-sequence detection when compiling; our explicit mask must not."""
    packed, separate = packed_and_separate(tiny_gpt2("sdpa"), "sdpa", compile_backend="aot_eager")
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_hidden_state_loss_path_equals_transformers_loss():
    """The fused-loss path (hidden states + linear + CE; Liger's kernel on GPUs) computes the same
    loss and gradients as GPT2LMHeadModel's own loss."""
    from hf_gpt.model import causal_lm_loss

    model = tiny_gpt2("sdpa")  # eval mode: no dropout, so both paths see the same network
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100
    inputs = {"input_ids": ids, "labels": labels}
    n = (labels[:, 1:] != -100).sum()
    losses, grads = [], []
    for fused in (False, True):
        model.zero_grad()
        loss = causal_lm_loss(model, inputs, n, fused)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.transformer.wte.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention and Liger need a GPU")
@pytest.mark.parametrize("impl", ["sdpa", "flex_attention", "varlen", pytest.param(
    "varlen+fa4", marks=pytest.mark.skipif(bool(fa4_unavailable()), reason=f"FA4: {fa4_unavailable()}"))])
def test_packed_equals_separate_on_gpu_with_compile(impl, monkeypatch):
    """The fast path (compiled, bf16: varlen flash, flex BlockMask or sdpa mask) keeps documents apart too."""
    import hf_gpt.model
    from hf_gpt.model import PACKED, qkv_attention

    if impl == "varlen+fa4":
        monkeypatch.setattr(hf_gpt.model, "_varlen_kernel", "fa4")
        impl = "varlen"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=256, n_embd=128, n_layer=2, n_head=4)
    config._attn_implementation = attention_name(impl)
    model = GPT2LMHeadModel(config).cuda().eval()
    if impl == "varlen":
        qkv_attention(model)  # as the engine trains it
    docs = [torch.randint(1, 512, (n,), device="cuda") for n in (100, 60, 96)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d), device="cuda") for d in docs])[None]
    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        packed = compiled(input_ids=ids, position_ids=pos, **document_mask_inputs(pos, impl)).logits[0].float()
        config._attn_implementation = "sdpa"  # the reference: each document alone, transformers' own sdpa
        separate = torch.cat([model(input_ids=d[None]).logits[0].float() for d in docs])
    assert config._attn_implementation == "sdpa" and PACKED
    torch.testing.assert_close(packed, separate, atol=3e-2, rtol=3e-2)  # bf16
    error = ((packed - separate).norm() / separate.norm()).item()
    assert error < 1e-2, error


def same_document_causal(cu_seq_lens, tokens: int):
    """(tokens, tokens): True where a query may see a key — earlier or itself, in its own document."""
    starts = torch.zeros(tokens, dtype=torch.long)
    starts[cu_seq_lens[:-1].long()] = 1
    doc = starts.cumsum(0)
    return (doc[:, None] == doc[None, :]).tril()


def block_diagonal_attention(q, k, v, cu_seq_lens, scale):
    """Causal attention within each document, (tokens, heads, dim) in and out, and its log-sum-exp (heads,
    tokens): the function flash-attn-4's kernels compute, in plain PyTorch."""
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~same_document_causal(cu_seq_lens, q.shape[0]), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v), scores.logsumexp(-1)


class StandInFA4:
    """flash-attn-4's `_flash_attn_fwd` and `_flash_attn_bwd` (their arguments, layouts and outputs) computed by
    block_diagonal_attention, so the custom ops around them run on a CPU. Records what the backward got."""

    def forward(self, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                return_lse):
        assert causal and return_lse and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        out, lse = block_diagonal_attention(q, k, v, cu_seqlens_q, softmax_scale)
        return out, lse, None, None, None

    def backward(self, q, k, v, out, dout, lse, softmax_scale, causal, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, dq, dk, dv):
        # Attention's backward by hand, from the forward's out and log-sum-exp as flash kernels do it (autograd
        # records nothing inside a custom op).
        assert causal and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        self.saved = (out, lse)
        scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
        p = (scores - lse[..., None]).exp() * same_document_causal(cu_seqlens_q, q.shape[0])
        dp = torch.einsum("qhd,khd->hqk", dout, v)
        ds = p * (dp - (dout * out).sum(-1).T[..., None])
        dq.copy_(torch.einsum("hqk,khd->qhd", ds, k) * softmax_scale)
        dk.copy_(torch.einsum("hqk,qhd->khd", ds, q) * softmax_scale)
        dv.copy_(torch.einsum("hqk,qhd->khd", p, dout))


@pytest.mark.parametrize("compiled", [False, True])
def test_fa4_custom_ops_carry_forward_and_backward(monkeypatch, compiled):
    """hf_gpt.fa4's custom ops hand flash-attn-4's kernels the right tensors and write their gradients for q, k and
    v into the projection's gradient, also compiled with fullgraph over batches of different document counts (its kernels need a GPU: these are
    stand-ins; the GPU tests here run the real ones)."""
    from hf_gpt import fa4

    kernels = StandInFA4()
    monkeypatch.setattr(fa4, "kernels", lambda: (kernels.forward, kernels.backward))
    attention = torch.compile(fa4.varlen_attention, backend="aot_eager", fullgraph=True) if compiled \
        else fa4.varlen_attention
    for bounds in ([0, 5, 12, 20], [0, 3, 20]):
        cu = torch.tensor(bounds, dtype=torch.int32)
        torch._dynamo.maybe_mark_dynamic(cu, 0)
        qkv = torch.randn(20, 3 * 2 * 8, generator=torch.Generator().manual_seed(len(bounds)), requires_grad=True)
        out = attention(qkv.view(20, 3, 2, 8), cu, 20, 0.3)  # one projection, viewed as GPT-2's q, k and v
        grad = torch.randn_like(out)
        out.backward(grad)

        leaf = qkv.detach().requires_grad_()
        expected, lse = block_diagonal_attention(*(t.view(20, 2, 8) for t in leaf.split(16, dim=1)), cu, 0.3)
        expected.backward(grad)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(qkv.grad, leaf.grad)
        torch.testing.assert_close(kernels.saved[0], expected.detach())  # the backward got the forward's out
        torch.testing.assert_close(kernels.saved[1], lse.detach())  # and its log-sum-exp


def test_varlen_kernel_choice_on_a_cpu():
    from hf_gpt.config import UserError
    from hf_gpt.model import use_varlen_kernel, varlen_kernel

    assert use_varlen_kernel("auto", torch.device("cpu")) == "torch" == varlen_kernel()
    with pytest.raises(UserError, match="^varlen_kernel fa4: FA4 runs on NVIDIA GPUs, not cpu$"):
        use_varlen_kernel("fa4", torch.device("cpu"))
    assert varlen_kernel() == "torch"


@pytest.mark.skipif(bool(fa4_unavailable()), reason=f"FA4: {fa4_unavailable()}")
def test_fa4_matches_pytorch_varlen_kernel_on_gpu():
    """FA4 against PyTorch's FlashAttention-2 kernel on the same packed documents, both against float32: its
    output and gradients are as close to the exact values as the kernel it replaces."""
    from hf_gpt import fa4
    from hf_gpt.model import VARLEN_CAUSAL
    from torch.nn.attention.varlen import varlen_attn

    tokens, heads, dim = 4096, 12, 64
    cu = torch.tensor([0, 700, 1024, 1900, 2048, 3000, 3072, 4096], dtype=torch.int32, device="cuda")
    qkv0 = torch.randn(tokens, 3 * heads * dim, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grad = torch.randn(tokens, heads, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def run(kernel, dtype):
        qkv = qkv0.to(dtype).clone().requires_grad_()  # a leaf of its own in each dtype, float32 too
        out = kernel(qkv.view(tokens, 3, heads, dim))
        out.backward(grad.to(dtype))
        return out.float(), qkv.grad.float()

    exact = run(lambda qkv: block_diagonal_attention(*qkv.cpu().unbind(1), cu.cpu(), dim ** -0.5)[0].cuda(),
                torch.float32)
    torch_kernel = run(lambda qkv: varlen_attn(*qkv.unbind(1), cu, cu, 1024, 1024, **VARLEN_CAUSAL), torch.bfloat16)
    fa4_kernel = run(lambda qkv: fa4.varlen_attention(qkv, cu, 1024, dim ** -0.5), torch.bfloat16)
    for ours, theirs, truth in zip(fa4_kernel, torch_kernel, exact):
        error = ((ours - truth).norm() / truth.norm()).item()
        assert error < 1.25 * ((theirs - truth).norm() / truth.norm()).item() and error < 1e-2, error


@pytest.mark.parametrize("tied", [True, False])
def test_the_memory_estimate_counts_the_parameters_the_model_has(tied, monkeypatch):
    """check_shape estimates from the config alone, before building: its count is the built model's."""
    from hf_gpt.config import PretrainConfig, UserError
    from hf_gpt import model as model_module

    cfg = PretrainConfig(n_layer=3, n_head=4, n_embd=48, block_size=40, tie_word_embeddings=tied, micro_batch_size=2)
    assert model_module.parameter_count(cfg, 300) == model_module.build_model(cfg, 300, 0).num_parameters()
    need = model_module.training_memory(cfg, 300)
    assert need > 16 * model_module.parameter_count(cfg, 300)  # and the micro-batch's activations
    monkeypatch.setattr(model_module, "machine_memory", lambda: (need - 1, "this machine's RAM"))
    with pytest.raises(UserError, match=r"needs about .* GiB to train at micro_batch_size 2, more than this "
                                        r"machine's RAM"):
        model_module.build_model(cfg, 300, 0)
