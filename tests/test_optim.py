from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gpt.optim import build_optimizer, build_scheduler, decay_parameter_names


def cfg(**kw):
    base = dict(learning_rate=1e-3, weight_decay=0.1, weight_decay_everywhere=False, adam_beta1=0.9,
                adam_beta2=0.95, adam_epsilon=1e-8, warmup_steps=0, warmup_ratio=0.0)
    return SimpleNamespace(**{**base, **kw})


def test_decay_lands_exactly_on_weight_matrices():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    expected = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert decay_parameter_names(model) == expected  # no biases, LayerNorms, wte/wpe, tied lm_head
    decay, no_decay = build_optimizer(model, cfg()).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == expected
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_untied_head_is_a_matrix_and_decays():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       tie_word_embeddings=False))
    assert "lm_head.weight" in decay_parameter_names(model)


def test_seed_article_setting_decays_everything():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    decay, no_decay = build_optimizer(model, cfg(weight_decay_everywhere=True)).param_groups
    assert not no_decay["params"] and len(decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant", "linear"])
def test_warmup_starts_above_zero_and_reaches_the_full_rate(kind):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(optimizer, cfg(lr_scheduler=kind, warmup_steps=3, min_lr_ratio=0.1, decay_ratio=0.2), 10)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0])  # nanoGPT's (step + 1) / (warmup + 1), then the schedule


def test_warmup_ratio_is_a_share_of_the_run():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(optimizer, cfg(lr_scheduler="constant", warmup_ratio=0.3), 10)  # 3 of 10 steps
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("ratio, steps, expected", [(0.05, 50, 3), (0.05, 4096, 205), (0.0, 10, 0)])
def test_warmup_ratio_rounds_up_as_transformers_does(ratio, steps, expected):
    from transformers import TrainingArguments

    from hf_gpt.optim import warmup_steps

    assert warmup_steps(cfg(warmup_ratio=ratio), steps) == expected
    if ratio:  # transformers 5 reads a warmup_steps below 1 as the share
        assert TrainingArguments(output_dir="unused", warmup_steps=ratio).get_warmup_steps(steps) == expected
    # Where the product is whole but for float noise (0.3 x 10 = 3.0000000000000004), 3 steps, not 4.
    assert warmup_steps(cfg(warmup_ratio=0.3), 10) == 3


def test_warmup_steps_and_ratio_together_are_refused():
    from hf_gpt.config import PretrainConfig, UserError, load_config

    with pytest.raises(UserError, match="set warmup_steps .* or warmup_ratio"):
        load_config(PretrainConfig, ["--warmup_steps", "5", "--warmup_ratio", "0.05"])
    assert load_config(PretrainConfig, ["--warmup_steps", "0", "--warmup_ratio", "0.05"]).warmup_ratio == 0.05
