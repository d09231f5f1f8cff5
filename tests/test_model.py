import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gpt.model import attention_name, document_causal_mask, document_mask_inputs


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


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention"])
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
@pytest.mark.parametrize("impl", ["sdpa", "flex_attention"])
def test_packed_equals_separate_on_gpu_with_compile(impl):
    """The fast path (compiled, bf16, flex BlockMask or sdpa mask) keeps documents apart too."""
    from hf_gpt.model import FLEX, attention_name

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
        config._attn_implementation = "sdpa"  # the reference: each document alone, plain causal attention
        separate = torch.cat([model(input_ids=d[None]).logits[0].float() for d in docs])
    assert config._attn_implementation == "sdpa" and FLEX
    torch.testing.assert_close(packed, separate, atol=3e-2, rtol=3e-2)  # bf16
    error = ((packed - separate).norm() / separate.norm()).item()
    assert error < 1e-2, error
