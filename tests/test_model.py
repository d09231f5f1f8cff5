import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gpt.model import attention_name, document_bounds, document_causal_mask, document_mask_inputs


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
@pytest.mark.parametrize("impl", ["sdpa", "flex_attention", "varlen"])
def test_packed_equals_separate_on_gpu_with_compile(impl):
    """The fast path (compiled, bf16: varlen flash, flex BlockMask or sdpa mask) keeps documents apart too."""
    from hf_gpt.model import PACKED

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=256, n_embd=128, n_layer=2, n_head=4)
    config._attn_implementation = attention_name(impl)
    model = GPT2LMHeadModel(config).cuda().eval()
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
