"""What a subtly broken training loop would get wrong while it still trains: the gradient scale over
processes, the learning rate of each step, clipping, evaluation mode, bf16 autocast, the token-shard
stream on resume, and a non-finite gradient at a finite loss."""

import copy
import json
import math
import shutil

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import ROOT, assert_losses_match, assert_weights_match, run_script
from hf_gpt.benchmarks import load_benchmark, run_hellaswag
from hf_gpt.checkpoints import checkpoint_dirs
from hf_gpt.config import PretrainConfig, UserError, load_config
from hf_gpt.data import PretrainData
from hf_gpt.engine import evaluate, train
from hf_gpt.loading import load_tokenizer
from hf_gpt.model import build_model
from hf_gpt.optim import build_optimizer, build_scheduler
from hf_gpt.start import start_run
from hf_gpt.throughput import flops_per_token, peak_flops
from test_engine import in_process_run, launch_two, losses


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run) -> dict:
    return AutoModelForCausalLM.from_pretrained(run / "final").state_dict()


def test_two_processes_train_like_one_with_twice_the_batch(tiny_args, tmp_path):
    # As in test_accumulation_equals_one_large_batch, a huge Adam epsilon makes the update linear in the
    # gradient, so that a gradient scaled wrongly over processes shows in the weights.
    common = [*tiny_args, "--max_steps", "2", "--learning_rate", "10", "--adam_epsilon", "100", "--warmup_steps", "0",
              "--max_grad_norm", "0"]
    one = in_process_run([*common, "--micro_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    # Each of the two processes takes 4 of the 8 rows the one process reads (tests/two_process_train.py).
    launch_two("tests/two_process_train.py", *common, "--micro_batch_size", "8", "--output_dir", str(tmp_path / "two"))
    two = final_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["built"] == ranks[1]["built"]  # the recipe built the same weights on both processes
    assert ranks[0]["rand"] != ranks[1]["rand"]  # but each draws its own dropout masks


def schedule(cfg, steps: int) -> list[float]:
    """The learning rate of each step, from a fresh scheduler stepped once per step."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    scheduler = build_scheduler(optimizer, cfg, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_each_step_logs_the_learning_rate_it_trained_with(tiny_args, tmp_path):
    args = [*tiny_args, "--max_steps", "6", "--warmup_steps", "3", "--lr_scheduler", "cosine"]
    in_process_run([*args, "--output_dir", str(tmp_path / "run")])
    cfg = load_config(PretrainConfig, args)
    logged = [r["lr"] for r in rows(tmp_path / "run") if "lr" in r]
    assert logged[0] == pytest.approx(cfg.learning_rate / 4)  # warmup's first step already learns
    assert logged == pytest.approx(schedule(cfg, 6), rel=1e-9)


def test_the_logged_gradient_norm_is_before_clipping_and_clipping_bounds_the_update(tiny_args, tmp_path):
    # With a huge Adam epsilon, AdamW's first update is lr / eps x the gradient it received (here x 1), so
    # the size of the update is the norm of the gradient after clipping.
    args = [*tiny_args, "--max_steps", "1", "--learning_rate", "1000", "--adam_epsilon", "1000", "--warmup_steps", "0",
            "--weight_decay", "0"]
    cfg = load_config(PretrainConfig, args)
    set_seed(cfg.seed)  # as start_run does before the recipe builds the model
    initial = dict(build_model(cfg, 512, 0).named_parameters())

    def update_norm(weights):
        return math.sqrt(sum(((weights[n] - p.detach()).double() ** 2).sum().item() for n, p in initial.items()))

    clipped = in_process_run([*args, "--max_grad_norm", "0.05", "--output_dir", str(tmp_path / "clipped")])
    unclipped = in_process_run([*args, "--max_grad_norm", "0", "--output_dir", str(tmp_path / "unclipped")])
    norms = [rows(tmp_path / run)[0]["grad_norm"] for run in ("clipped", "unclipped")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6) and norms[0] > 0.2  # logged before clipping
    assert update_norm(unclipped) == pytest.approx(norms[1], rel=1e-3)
    assert update_norm(clipped) == pytest.approx(0.05, rel=1e-3)


def test_without_qkv_bias_the_attention_projection_bias_stays_zero_through_training(tiny_args, tmp_path):
    # The seed article's model had no bias on q, k, v: a GPT2LMHeadModel's c_attn always has one, held at
    # zero and frozen here. Weight decay on everything and a high learning rate would move it if it trained.
    args = [*tiny_args, "--max_steps", "3", "--weight_decay_everywhere", "true", "--learning_rate", "0.1"]
    cfg = load_config(PretrainConfig, [*args, "--qkv_bias", "false"])
    model = build_model(cfg, 512, 0)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen) == {f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)}
    optimized = {id(p) for group in build_optimizer(model, cfg).param_groups for p in group["params"]}
    assert optimized.isdisjoint(map(id, frozen.values()))

    weights = in_process_run([*args, "--qkv_bias", "false", "--output_dir", str(tmp_path / "none")])
    with_bias = in_process_run([*args, "--output_dir", str(tmp_path / "bias")])
    for i in range(2):  # loaded by plain transformers, as a GPT2LMHeadModel
        assert weights[f"transformer.h.{i}.attn.c_attn.bias"].abs().max() == 0
        assert weights[f"transformer.h.{i}.attn.c_proj.bias"].abs().max() > 0  # its neighbour trained
        assert with_bias[f"transformer.h.{i}.attn.c_attn.bias"].abs().max() > 0  # and with it, it trains


def test_evaluation_runs_the_model_in_eval_mode():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                       resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids}]
    model.train()
    first, second = (evaluate(model, batches, torch.ones(64), "sdpa")["val_loss"] for _ in range(2))
    assert model.training  # left as it was found
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert first == second == pytest.approx(expected, rel=1e-6)


def test_bf16_autocast_on_cpu_trains_close_to_fp32(tiny_args, tmp_path):
    args = [*tiny_args, "--max_steps", "8"]
    in_process_run([*args, "--output_dir", str(tmp_path / "fp32")])
    # A fresh process: Accelerate fixes the mixed precision once per process.
    run_script("scripts/pretrain.py", *args, "--mixed_precision", "bf16", "--output_dir", str(tmp_path / "bf16"))
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["mixed_precision"] == "bf16"
    weights = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # autocast computes in bf16, weights stay fp32
    assert bf16[8] < bf16[1] - 0.2  # it trains
    gaps = [abs(bf16[s] - fp32[s]) for s in fp32]
    assert 0 < max(gaps) < 0.01, gaps  # computed in bf16 (not identical), yet close


def test_token_shards_resume_exactly(corpus, tokenizer_dir, tiny_args, tmp_path):
    shards = tmp_path / "shards"
    run_script("scripts/prepare_data.py", "--dataset", str(corpus), "--tokenizer", str(tokenizer_dir),
               "--val_fraction", "0.1", "--shard_tokens", "1000", "--output_dir", str(shards))
    args = [*tiny_args, "--dataset", str(shards), "--max_steps", "12", "--save_every", "4", "--keep_checkpoints", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("scripts/pretrain.py", *args, "--output_dir", str(straight))
    # What kill -9 after the step-4 checkpoint leaves: the run so far, nothing after that checkpoint.
    shutil.copytree(straight, resumed)
    for later in [*checkpoint_dirs(resumed)[1:], resumed / "final"]:
        shutil.rmtree(later)
    weights = in_process_run([*args, "--output_dir", str(resumed), "--resume"])
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert_losses_match(a, b)
    assert_weights_match(final_weights(straight), weights)


def test_an_inf_gradient_at_a_finite_loss_stops_the_run_before_it_reaches_the_weights(tiny_args, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(PretrainConfig, [*tiny_args, "--max_steps", "8", "--gradient_accumulation_steps", "2",
                                       "--save_every", "2", "--log_every", "5", "--output_dir", str(run)])
    accelerator = start_run(cfg)
    data = PretrainData(cfg, load_tokenizer(cfg.tokenizer))
    model = build_model(cfg, len(data.tokenizer), data.tokenizer.eos_token_id)
    name = "transformer.h.1.mlp.c_fc.weight"
    backward_passes = 0

    def poison(grad):  # one inf in this gradient at step 3's second micro-batch; the loss stays finite
        nonlocal backward_passes
        backward_passes += 1
        if backward_passes == 3 * 2:
            grad = grad.clone()
            grad[0, 0] = math.inf
        return grad

    model.get_parameter(name).register_hook(poison)
    with pytest.raises(UserError) as error:
        train(cfg, model, data.tokenizer, data, accelerator)
    message = str(error.value)
    assert message.startswith("training diverged: loss ") and " at step 3, gradient norm inf" in message, message
    assert math.isfinite(float(message.split()[3]))
    assert f"first non-finite: the gradient of {name} after micro-batch 2 of 2;" in message, message
    # Found before the step-4 checkpoint (the first host check after step 3), which is never written.
    assert "nothing saved after " + str(run / "checkpoints" / "step_00000002") in message
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"] and not (run / "final").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # step 3 never reached the weights


def test_a_fused_adamw_skips_a_non_finite_step_whole():
    """With a fused AdamW (GPUs) the guard sets the optimizer's found_inf flag instead of zeroing each
    gradient: the bad step changes neither weights nor AdamW's state, the next finite step updates."""
    from types import SimpleNamespace

    from hf_gpt.guard import FiniteGuard

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, scaler=None, device=torch.device("cpu"))
    guard = FiniteGuard(model, accelerator, optimizer)
    assert guard.fused is optimizer

    def step(number, poison):
        loss = model(torch.ones(1, 3)).sum()
        loss.backward()
        if poison:
            model.weight.grad[0, 0] = math.inf
        guard.check_step(number, loss.detach(), torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        optimizer.step()
        optimizer.zero_grad()

    before = [p.detach().clone() for p in model.parameters()]
    step(1, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(s["step"].item() == 0 for s in optimizer.state.values())
    assert guard.failed[0].item() == 1 and guard.failed[2].item() == math.inf
    step(2, poison=False)
    assert not torch.equal(before[0], model.weight) and guard.failed[0].item() == 1  # the first failure stays


def test_mixed_precision_training_forward_keeps_bf16_logits_and_an_fp32_loss():
    """Accelerate converts every half-precision output to float32: for the training forward a float32 copy
    of the (tokens x vocabulary) logits that nothing reads. The engine unwraps that conversion only."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_gpt.engine import keep_outputs_in_half

    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        config = GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=4, eos_token_id=0)
        model = accelerator.prepare(GPT2LMHeadModel(config).eval())  # eval: no dropout, so both calls agree
        ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
        before = model(input_ids=ids, labels=ids)
        assert before.logits.dtype == torch.float32
        keep_outputs_in_half(accelerator.unwrap_model(model))
        after = model(input_ids=ids, labels=ids)
        assert after.logits.dtype == torch.bfloat16  # autocast still on
        assert after.loss.dtype == torch.float32 and torch.equal(after.loss, before.loss)
    finally:
        AcceleratorState._reset_state(True)


def test_training_forward_returns_detached_logits_inside_the_compiled_graph():
    """Training logits that nothing reads get no gradient of zeros in a compiled backward: the forward with a loss
    returns them detached, from inside the graph (fullgraph: no break around the hook), with the same gradients;
    without labels or in eval mode the logits keep their gradient."""
    from hf_gpt.engine import detach_training_logits

    config = GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=4, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(config).train()
    plain.loss_type = "ForCausalLM"  # as prepare_training sets it: transformers' warning otherwise breaks the graph
    model = copy.deepcopy(plain)
    detach_training_logits(model)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(input_ids=ids, labels=ids, use_cache=False)
    assert not out.logits.requires_grad and out.loss.requires_grad
    out.loss.backward()
    plain(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert compiled(input_ids=ids, use_cache=False).logits.requires_grad  # no loss: the logits are the output
    assert model.eval()(input_ids=ids, labels=ids).logits.requires_grad


HELLASWAG = ROOT / "tests" / "data" / "hellaswag_val_tiny.jsonl.xz"  # Rowan/hellaswag's fields, 8 items


def test_hellaswag_is_scored_at_every_evaluation_and_drawn_against_gpt2(tiny_args, tmp_path):
    run = tmp_path / "hs"
    in_process_run([*tiny_args, "--max_steps", "4", "--eval_every", "2", "--hellaswag", str(HELLASWAG),
                    "--hellaswag_items", "6", "--output_dir", str(run)])
    evals = [r for r in rows(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(list(r["eval_seconds"]) == ["validation", "hellaswag", "samples"] for r in evals)
    # The last evaluation scored the final weights: the same figures as compare.py's scorer gives them.
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    docs, _ = load_benchmark("hellaswag", str(HELLASWAG), 6)
    expected = run_hellaswag(model, load_tokenizer(str(run / "final")), docs)
    assert {k: evals[-1][k] for k in expected} == pytest.approx(expected)
    assert json.loads((run / "summary.json").read_text())["eval"]["hellaswag_acc_norm"] == evals[-1]["hellaswag_acc_norm"]
    from PIL import Image

    assert Image.open(run / "loss.png").width == 12 * 120  # the loss panel and the HellaSwag panel beside it


def test_each_log_row_carries_speed_memory_and_the_time_left(tiny_args, tmp_path):
    run = tmp_path / "speed"
    in_process_run([*tiny_args, "--max_steps", "3", "--output_dir", str(run)])
    logged = [r for r in rows(run) if "loss" in r]
    assert [r["mfu"] for r in logged] == [None] * 3  # a CPU has no peak in the table
    assert all(0.05 < r["peak_memory_gib"] < 64 for r in logged)
    assert logged[0]["eta_s"] > logged[1]["eta_s"] > logged[2]["eta_s"] == 0
    assert json.loads((run / "summary.json").read_text())["launch_to_first_step_s"] > 0


def test_mfu_counts_gpt2_small_as_nanogpt_and_knows_its_gpus(monkeypatch):
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32))
    weights = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, 32) == 6 * weights + 12 * 2 * 64 * 32
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda")) == peak
    assert peak_flops(torch.device("cpu")) is None
