import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gpt.optim import build_optimizer, build_scheduler, decay_parameter_names


def as_linear(model) -> set[str]:
    """GPT-2's Conv1D layers swapped in place for the nn.Linear they are, weights held (out, in), the layout
    torch.optim.Muon reads: a reference for the engine's Muon, which trains GPT-2 as stored. The swapped weights'
    names."""
    from transformers.pytorch_utils import Conv1D

    swapped = set()
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is Conv1D:
                linear = torch.nn.Linear(child.nx, child.nf)
                linear.weight.data, linear.bias.data = child.weight.data.t().contiguous(), child.bias.data
                setattr(module, name, linear)
                swapped.add(f"{prefix}.{name}.weight" if prefix else f"{name}.weight")
    return swapped


def cfg(**kw):
    base = dict(optimizer="adamw", learning_rate=1e-3, weight_decay=0.1, weight_decay_everywhere=False, adam_beta1=0.9,
                adam_beta2=0.95, adam_epsilon=1e-8, warmup_steps=0, warmup_ratio=0.0, muon_learning_rate=0.02,
                muon_momentum=0.95, muon_nesterov=True, muon_weight_decay=0.1, muon_adjust_lr="original",
                muon_split_qkv=True)
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


# Muon

HIDDEN = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny_gpt2(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0, **kw))


def train_steps(model, optimizer, steps=3):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tied):
    model = tiny_gpt2(tie_word_embeddings=tied)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(model, cfg(optimizer="muon")).param_groups
    muon = {names[id(p)] for g in groups if g["muon"] for p in g["params"]}
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in HIDDEN}
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.95 and g["weight_decay"] == 0.1 for g in groups if g["muon"])
    decayed, other = [g for g in groups if not g["muon"]]
    assert decayed["lr"] == other["lr"] == 1e-3 and other["weight_decay"] == 0
    # An untied head is an output layer, not a hidden one: AdamW, decayed as a matrix; a tied one is the embedding.
    assert {names[id(p)] for p in decayed["params"]} == ({"lm_head.weight"} if not tied else set())
    assert len(muon) + len(decayed["params"]) + len(other["params"]) == len(names)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_updates_linear_matrices_as_torch_muon_and_the_rest_as_adamw(adjust):
    ours, reference = tiny_gpt2(), tiny_gpt2()
    as_linear(ours)
    as_linear(reference)
    train_steps(ours, build_optimizer(ours, cfg(optimizer="muon", muon_split_qkv=False, muon_adjust_lr=adjust)))
    hidden = [p for n, p in reference.named_parameters() if n.endswith(tuple(f"{m}.weight" for m in HIDDEN))]
    rest = [p for p in reference.parameters() if all(p is not h for h in hidden)]
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=adjust)
    adamw = torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    class Both:
        def step(self):
            muon.step()
            adamw.step()

        def zero_grad(self):
            muon.zero_grad()
            adamw.zero_grad()

    train_steps(reference, Both())
    expected = reference.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-7, rtol=0)


@pytest.mark.parametrize("shape", [(16, 16), (64, 16), (16, 64), (48, 16)])
def test_newton_schulz_orthogonalises_a_stack_as_torch_does_each_matrix(shape):
    """Muon's step orthogonalises the matrices of one shape as one stack: each comes out bit for bit as
    torch.optim.Muon's own Newton-Schulz makes it alone (wide, tall and square; CPU)."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _zeropower_via_newtonschulz

    from hf_gpt.optim import newton_schulz

    stack = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    stack[2] *= 1e3  # each matrix is normalised by its own norm, not the stack's
    out = newton_schulz(stack)
    for matrix, ortho in zip(stack, out):
        assert torch.equal(ortho, _zeropower_via_newtonschulz(matrix, (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                                                              DEFAULT_NS_STEPS, EPS))


def one_muon_step(model, **kw) -> dict:
    before = {n: p.clone() for n, p in model.state_dict().items()}
    train_steps(model, build_optimizer(model, cfg(optimizer="muon", **kw)), steps=1)
    return {n: p - before[n] for n, p in model.state_dict().items()}


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_a_matrix_gets_the_update_of_its_out_in_shape_in_either_layout(split, adjust):
    conv, linear = tiny_gpt2(), tiny_gpt2()
    swapped = as_linear(linear)
    conv_update = one_muon_step(conv, muon_split_qkv=split, muon_adjust_lr=adjust)
    linear_update = one_muon_step(linear, muon_split_qkv=split, muon_adjust_lr=adjust)
    assert len(swapped) == 4 * 2  # every hidden matrix of both blocks
    for name, update in conv_update.items():  # Conv1D holds (in, out): the same update, transposed
        expected = linear_update[name].t() if name in swapped else linear_update[name]
        torch.testing.assert_close(update, expected, atol=1e-5, rtol=0)
    # torch.optim.Muon itself reads a Conv1D weight (in, out) as (out, in): c_fc (16 -> 64) would get the scale of
    # a 16 x 64 matrix, 1, instead of sqrt(64 / 16) = 2 ("original").
    if adjust == "original" and not split:
        model = tiny_gpt2()
        fc = model.transformer.h[0].mlp.c_fc.weight
        before = fc.detach().clone()
        train_steps(model, torch.optim.Muon([fc], lr=0.02, weight_decay=0.1, momentum=0.95), steps=1)
        naive = fc.detach() - before
        ours = conv_update["transformer.h.0.mlp.c_fc.weight"]
        assert (ours.norm() / naive.norm()).item() == pytest.approx(2.0, rel=0.05)


def test_split_qkv_orthogonalises_query_key_and_value_apart():
    def c_attn_after_one_step(split):
        model = tiny_gpt2()
        as_linear(model)
        train_steps(model, build_optimizer(model, cfg(optimizer="muon", muon_split_qkv=split)), steps=1)
        return model.transformer.h[0].attn.c_attn.weight.detach()

    # torch.optim.Muon on three matrices: the query's, key's and value's rows of c_attn (out, in), with their gradients.
    model = tiny_gpt2()
    as_linear(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    c_attn = model.transformer.h[0].attn.c_attn.weight
    blocks = [torch.nn.Parameter(w.detach().clone()) for w in c_attn.chunk(3)]
    for block, grad in zip(blocks, c_attn.grad.chunk(3)):
        block.grad = grad.clone()
    torch.optim.Muon(blocks, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True).step()
    split = c_attn_after_one_step(True)
    torch.testing.assert_close(split, torch.cat([b.detach() for b in blocks]), atol=1e-7, rtol=0)
    assert (split - c_attn_after_one_step(False)).abs().max() > 1e-3  # one matrix is another update


def test_muon_skips_a_non_finite_step_whole_on_found_inf():
    """As a fused AdamW does (test_loop): the FiniteGuard sets found_inf, and neither the weights nor the state of
    either part move; the next finite step updates as if the bad one had never been."""
    from hf_gpt.guard import FiniteGuard

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, scaler=None, device=torch.device("cpu"))

    def flagged():  # as on a GPU, where AdamW is fused: the guard flags a bad step instead of zeroing gradients
        model = tiny_gpt2()
        optimizer = build_optimizer(model, cfg(optimizer="muon"))
        optimizer.defaults["fused"] = True
        for group in optimizer.param_groups:
            group["fused"] = True
        guard = FiniteGuard(model, accelerator, optimizer)
        assert guard.fused is optimizer
        return model, optimizer, guard

    def step(model, optimizer, guard, number, poison=False):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if poison:
            model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = math.inf
        guard.check_step(number, loss.detach(), torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer, guard = flagged()
    step(model, optimizer, guard, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    step(model, optimizer, guard, 2, poison=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())
    assert guard.failed[0].item() == 2
    step(model, optimizer, guard, 3)
    twin = flagged()  # two finite steps, none skipped
    step(*twin, 1)
    step(*twin, 2)
    expected = twin[0].state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    # And a flag that stays 0 updates as Muon does without it, up to the rounding of Newton-Schulz's bf16.
    plain = tiny_gpt2()
    train_steps(plain, build_optimizer(plain, cfg(optimizer="muon")), steps=1)
    once = flagged()
    step(*once, 1)
    for name, value in once[0].state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[name], atol=1e-6, rtol=0)


def test_muon_is_refused_where_it_cannot_run():
    from accelerate import DistributedType

    from hf_gpt.config import UserError
    from hf_gpt.optim import check_optimizer

    with pytest.raises(UserError, match="optimizer must be one of adamw, muon, not 'sgd'"):
        check_optimizer(cfg(optimizer="sgd"))
    with pytest.raises(UserError, match="muon_adjust_lr must be one of original, match_rms_adamw"):
        check_optimizer(cfg(optimizer="muon", muon_adjust_lr="spectral"))
    with pytest.raises(UserError, match="does not run under FSDP: Muon orthogonalises each whole matrix"):
        check_optimizer(cfg(optimizer="muon"), DistributedType.FSDP)
    check_optimizer(cfg(optimizer="adamw"), DistributedType.FSDP)
    check_optimizer(cfg(optimizer="muon"), DistributedType.MULTI_GPU)


# Muon through the engine

def muon_args(tiny_args):
    return [*tiny_args, "--optimizer", "muon", "--muon_learning_rate", "0.05"]


def test_muon_resumes_exactly_with_accumulation(tiny_args, tmp_path):
    from test_engine import StopAt, rows_without_timing, train_in_process
    from test_loop import final_weights

    common = [*muon_args(tiny_args), "--max_steps", "8", "--log_every", "3", "--gradient_accumulation_steps", "2"]
    train_in_process([*common, "--output_dir", str(tmp_path / "straight")])
    stopped = tmp_path / "stopped"
    # StopAt counts micro-batches: the 8th is step 4's last.
    assert train_in_process([*common, "--output_dir", str(stopped)], lambda data: StopAt(data, 8)).steps == 4
    assert train_in_process([*common, "--output_dir", str(stopped), "--resume"]).steps == 8
    assert rows_without_timing(stopped) == rows_without_timing(tmp_path / "straight")
    expected = final_weights(tmp_path / "straight")
    for name, value in final_weights(stopped).items():
        assert torch.equal(value, expected[name]), name


def test_muon_on_two_processes_trains_like_one_with_twice_the_batch(tiny_args, tmp_path):
    from test_engine import in_process_run, launch_two
    from test_loop import final_weights

    common = [*muon_args(tiny_args), "--max_steps", "2", "--warmup_steps", "0", "--micro_batch_size", "8"]
    one = in_process_run([*common, "--output_dir", str(tmp_path / "one")])
    # Each of the two processes takes 4 of the 8 rows the one process reads (tests/two_process_train.py).
    launch_two("tests/two_process_train.py", *common, "--output_dir", str(tmp_path / "two"))
    # Each process orthogonalised half of the matrices (optim.orthogonalise): both ended with the same weights.
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["trained"] == ranks[1]["trained"]
    two = final_weights(tmp_path / "two")
    initial = build_model_weights(tiny_args)
    for name in one:
        # Newton-Schulz runs in bf16: the all-reduce's rounding may move an entry by a bf16 step of the update.
        torch.testing.assert_close(two[name] - initial[name], one[name] - initial[name], atol=2e-3, rtol=0.05)
    assert any((one[n] - initial[n]).abs().max() > 0.01 for n in one)


def test_muon_shares_newton_schulz_between_processes_and_each_gets_the_whole_stack():
    from test_engine import launch_two

    result = launch_two("tests/two_process_muon.py", timeout=120)
    assert result.stdout.count("every stack as one process computes it") == 2


def build_model_weights(tiny_args) -> dict:
    from hf_gpt.config import PretrainConfig, load_config
    from hf_gpt.model import build_model
    from accelerate.utils import set_seed

    cfg = load_config(PretrainConfig, tiny_args)
    set_seed(cfg.seed)  # as start_run does before the recipe builds the model
    return build_model(cfg, 512, 0).state_dict()


def test_muon_trains_under_bf16_autocast(tiny_args, tmp_path):
    from safetensors.torch import load_file

    from conftest import run_script
    from test_engine import losses

    run = tmp_path / "bf16"
    run_script("scripts/pretrain.py", *muon_args(tiny_args), "--max_steps", "8", "--mixed_precision", "bf16",
               "--output_dir", str(run))
    loss = losses(run)
    assert loss[8] < loss[1] - 0.2  # it trains
    weights = load_file(run / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_muon_run_stops_at_a_non_finite_gradient_before_it_reaches_the_weights(tiny_args, tmp_path):
    """On a CPU the guard zeroes a bad step's gradients (no fused AdamW): the weights stay finite and the run stops
    at the next check with the line AdamW's runs give."""
    from hf_gpt.checkpoints import checkpoint_dirs
    from hf_gpt.config import PretrainConfig, UserError, load_config
    from hf_gpt.data import PretrainData
    from hf_gpt.engine import train
    from hf_gpt.loading import load_tokenizer
    from hf_gpt.model import build_model
    from hf_gpt.start import start_run

    run = tmp_path / "run"
    cfg = load_config(PretrainConfig, [*muon_args(tiny_args), "--max_steps", "8", "--save_every", "2",
                                       "--log_every", "5", "--output_dir", str(run)])
    accelerator = start_run(cfg)
    data = PretrainData(cfg, load_tokenizer(cfg.tokenizer))
    model = build_model(cfg, len(data.tokenizer), data.tokenizer.eos_token_id)
    name = "transformer.h.1.mlp.c_fc.weight"  # a Muon matrix
    passes = 0

    def poison(grad):  # one inf in this gradient at step 3
        nonlocal passes
        passes += 1
        if passes == 3:
            grad = grad.clone()
            grad[0, 0] = math.inf
        return grad

    model.get_parameter(name).register_hook(poison)
    with pytest.raises(UserError) as error:
        train(cfg, model, data.tokenizer, data, accelerator)
    assert " at step 3, gradient norm inf" in str(error.value)
    assert f"first non-finite: the gradient of {name}" in str(error.value)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"] and not (run / "final").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lora_keeps_adamw():
    from hf_gpt.config import UserError, load_config
    from hf_gpt.lora import LoraRunConfig, check_config

    cfg = load_config(LoraRunConfig, ["--model", "runs/sft/final", "--dataset", "writing", "--optimizer", "muon"])
    with pytest.raises(UserError, match="LoRA trains with AdamW: optimizer muon is for a whole model's hidden"):
        check_config(cfg)


def test_the_optimizer_choices_checked_before_work_are_the_optimizers_built():
    from hf_gpt.config import CHOICES
    from hf_gpt.optim import MUON_SCALINGS, OPTIMIZERS

    assert CHOICES["optimizer"] == tuple(OPTIMIZERS) and CHOICES["muon_adjust_lr"] == MUON_SCALINGS
