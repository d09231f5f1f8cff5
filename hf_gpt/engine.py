"""The one training loop, shared by pretraining, SFT and LoRA.

A recipe hands `train()` a model (plain or PEFT), its tokenizer and a data object with two methods:

    train_batches(process_index, num_processes) -> iterator of batch dicts with state_dict()/load_state_dict()
    eval_batches(process_index, num_processes)  -> list of batch dicts (this process's share of a fixed set,
                                                   cfg.eval_batches of them at most; hf_gpt.data.process_share)

and, for data of known size, a third that gives --epochs and eval_every 0 their meaning:

    steps_per_epoch(num_processes, accumulation) -> optimizer steps of one pass over the training data

A batch holds `input_ids` and `labels` (-100 where no loss), and optionally `position_ids` (packed
documents: positions restart at 0 per document, and attention is kept inside each document).
Padding goes on the right, where causal attention never sees it, so no padding mask is needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MethodType

import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from accelerate.utils import set_seed
from accelerate.utils.operations import ConvertOutputsToFp32
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from .benchmarks import HellaSwag
from .checkpoints import (CHECKPOINTS, check_resumable, checkpoint_dirs, load_checkpoint, save_checkpoint, save_final,
                          unwritable_as_error)
from .config import UserError, first_line, save_config
from .evaluation import EvalTask, Samples
from .files import atomic_write, recover_folders
from .guard import FiniteGuard
from .metrics_log import MetricsLog, run_summary
from .model import causal_lm_loss, document_mask_inputs, qkv_attention
from .optim import build_optimizer, build_scheduler
from .read_ahead import ReadAhead
from .throughput import duration, flops_per_token, peak_flops, peak_memory_gib
from .tokenizer import token_byte_lengths


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    steps: int
    tokens: int
    eval: dict
    stopped_early: bool
    stop_signal: int = 0  # the signal that stopped it (SIGINT, SIGTERM), 0 when it was not stopped


def accumulation_steps(cfg, tokens_per_micro_batch: int, num_processes: int) -> int:
    if cfg.gradient_accumulation_steps:
        return cfg.gradient_accumulation_steps
    if not cfg.tokens_per_step:
        return 1
    per_pass = tokens_per_micro_batch * num_processes
    if cfg.tokens_per_step % per_pass:
        raise UserError(f"tokens_per_step {cfg.tokens_per_step} is not a multiple of micro_batch_size x block_size "
                        f"x processes = {per_pass}")
    return cfg.tokens_per_step // per_pass


def model_inputs(batch: dict, device, attn_implementation: str) -> dict:
    # Pinned host memory lets the copy overlap with queued GPU work instead of waiting for it.
    pin = device.type == "cuda"
    inputs = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}
    if "position_ids" in inputs:
        # varlen's document bounds are read off the host copy; masks are built from the device copy.
        positions = batch["position_ids"] if attn_implementation == "varlen" else inputs["position_ids"]
        inputs.update(document_mask_inputs(positions, attn_implementation, device))
    return inputs


def target_count(batch: dict) -> torch.Tensor:
    """Tokens that carry loss: labels are shifted inside the model, so the first column never does."""
    return (batch["labels"][:, 1:] != -100).sum()


@torch.no_grad()
def evaluate(model, batches: list[dict], byte_lengths: torch.Tensor, attn_implementation: str = "sdpa",
             accelerator: Accelerator | None = None) -> dict:
    """Validation loss (nats per target token), perplexity and bits per byte over a fixed set: this process's
    batches summed over all processes with an `accelerator`, else this process's alone.

    Runs the model as it is, not compiled: a compiled model would compile again for evaluation (no
    gradients, eval mode, other shapes), which costs tens of seconds at every switch. Flex attention
    is a compiled kernel too, so its runs evaluate through sdpa with a dense document mask instead.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator else next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, targets, bytes
    byte_lengths = byte_lengths.to(device)
    mask_kind = "eager" if attn_implementation == "eager" else "sdpa"
    for batch in batches:
        inputs = model_inputs(batch, device, mask_kind)
        labels = inputs.pop("labels")[:, 1:]
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        keep = labels != -100
        totals += torch.stack([nll.double(), keep.sum().double(), byte_lengths[labels[keep]].sum().double()])
    if accelerator is not None:
        totals = accelerator.reduce(totals, "sum")
    model.train(was_training)
    nll, count, nbytes = totals.tolist()
    if not count:
        return {}
    loss = nll / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": nll / math.log(2) / nbytes if nbytes else float("nan")}


class StopSignal:
    """SIGINT/SIGTERM set `received` to the signal's number; the loop saves a checkpoint at the end of the step
    and stops, and the script exits with 128 + that number (hf_gpt.config.Stopped)."""

    def __init__(self):
        self.received = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_training(cfg, model, accelerator, total_steps: int):
    """Model on its device, the optimizer and the schedule, all through `accelerator.prepare`; plus the
    (optionally compiled) forward the loop calls."""
    peft = hasattr(model, "get_base_model")
    if cfg.attn_implementation == "varlen":
        qkv_attention(model)
    model.to(accelerator.device)
    # GPT-2 models (fresh, loaded, or under a PEFT wrapper) leave loss_type None, and transformers warns
    # at the first loss before falling back to this same causal-LM loss.
    base = model.get_base_model() if peft else model
    base.loss_type = base.loss_type or "ForCausalLM"
    optimizer = build_optimizer(model, cfg)  # after .to(): fused AdamW needs the parameters on the GPU
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    keep_outputs_in_half(unwrapped)
    detach_training_logits(unwrapped)
    scheduler = accelerator.prepare(build_scheduler(optimizer, cfg, total_steps))
    forward = torch.compile(model, mode=cfg.compile_mode or None) if cfg.compile else model
    return model, forward, optimizer, scheduler


def keep_outputs_in_half(model) -> None:
    """Undo Accelerate's conversion of a mixed-precision forward's outputs to float32, keep its autocast.

    The training forward returns the loss (float32 already) and the logits, which nothing reads: their
    float32 copy is (tokens x 50k) x 4 bytes, 6.6 GB written per 32k-token micro-batch.
    """
    forward = model.forward
    wrapper = getattr(getattr(forward, "__func__", forward), "__wrapped__", None)
    if isinstance(wrapper, ConvertOutputsToFp32):  # accelerate.Accelerator.prepare_model's two forms
        model.forward = MethodType(wrapper.model_forward, model) if hasattr(forward, "__func__") else wrapper.model_forward


def detach_training_logits(model) -> None:
    """A training forward that computes its loss returns its logits detached.

    Nothing reads them, but under torch.compile a graph output that requires grad and receives none gets
    a gradient of zeros in backward all the same: (tokens x 50k) zeros written and added to the loss's
    gradient, 2 ms of a 71 ms H100 step (torch.profiler). Detached inside the compiled graph (a
    forward hook is part of it), the output needs no gradient at all.
    """
    def hook(module, args, kwargs, output):
        if module.training and getattr(output, "loss", None) is not None:
            output["logits"] = output.logits.detach()
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def optimizer_step(cfg, accelerator, model, forward, optimizer, scheduler, micro_batches: list[dict],
                   guard: FiniteGuard, step: int):
    """Optimizer step number `step` over `micro_batches` (gradient accumulation). Returns the step's mean
    loss, its gradient norm before clipping and its token count, as device tensors: nothing here waits
    for the GPU."""
    inputs = [model_inputs(b, accelerator.device, cfg.attn_implementation) for b in micro_batches]
    # Normalise by the target tokens of the whole step on all processes, so k accumulated
    # micro-batches give the same update as one batch k times larger, whatever the padding.
    counts = torch.stack([sum(target_count(b) for b in inputs),
                          # torch.full writes on the device; torch.tensor would copy and wait for the GPU
                          torch.full((), sum(b["input_ids"].numel() for b in micro_batches), device=accelerator.device)])
    targets, tokens = accelerator.reduce(counts, "sum").unbind()
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(inputs):
        # Gradients are all-reduced only on the last micro-batch.
        sync = contextlib.nullcontext() if i == len(inputs) - 1 else accelerator.no_sync(model)
        with sync:
            loss = causal_lm_loss(forward, batch, targets, cfg.fused_cross_entropy)
            # DDP averages gradients over processes; the loss is already a global mean.
            accelerator.backward(loss * accelerator.num_processes)
        step_loss += loss.detach()
        guard.check_micro_batch(step, i, loss.detach())
    # An infinite bound clips nothing (it scales by exactly 1) but still gives the norm to check and log.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP2 returns it sharded
        grad_norm = grad_norm.full_tensor()
    step_loss = accelerator.reduce(step_loss, "sum")
    guard.check_step(step, step_loss, grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, tokens


def train(cfg, model, tokenizer, data, accelerator: Accelerator, *, final_name: str = "final",
          info: dict | None = None, mark_final=None) -> RunResult:
    """Train `model` on `data` as `cfg` says; checkpoints, metrics and `<output_dir>/<final_name>/`
    (`mark_final(folder)` adds to it before it is swapped in, e.g. LoRA's provenance)."""
    run = set_up(cfg, model, tokenizer, data, accelerator)
    out, main, total_steps = run.output_dir, accelerator.is_main_process, run.total_steps
    step, tokens = run.progress["step"], run.progress["tokens"]
    reached = run.progress.get("target", {})  # a run that ended at its stop_at_val_loss
    if step == total_steps or (reached and reached["val_loss"] <= cfg.stop_at_val_loss):
        # The checkpoint at the last step is saved after final/ and summary.json: nothing is left to do.
        accelerator.print(f"{out} already finished at step {step}; nothing to train")
        return RunResult(out, out / final_name, step, tokens, run.metrics.last_eval(), False)

    run.model.train()
    # The steps since the last log row. A checkpoint between log steps carries them, so that the first row
    # after a resume averages the same steps as in a run never stopped (older checkpoints: the steps since).
    window_loss = torch.full((), run.progress.get("window_loss", 0.0), device=accelerator.device)
    window_steps = run.progress.get("window_steps", 0)
    # The largest gradient norm of the window: spikes are what it is read for.
    window_grad_norm = torch.full((), run.progress.get("window_grad_norm", 0.0), device=accelerator.device)
    # Tokens are counted on the device (SFT batches vary in size) and read back on log steps.
    tokens_at_start, new_tokens = tokens, torch.zeros((), dtype=torch.long, device=accelerator.device)
    window_start = started = time.perf_counter()
    # Per processed token, from the model and the batch's length; with the device's peak (None: unknown) the MFU.
    flops, peak = flops_per_token(accelerator.unwrap_model(run.model), run.seq_len), peak_flops(accelerator.device)
    first_step = step + 1

    def tokens_now() -> int:
        return tokens_at_start + int(new_tokens.item())

    def progress_now() -> dict:
        return {"step": step, "tokens": tokens_now(), "window_loss": window_loss.item(), "window_steps": window_steps,
                "window_grad_norm": window_grad_norm.item(), "train_seconds": run.train_seconds(),
                "first_step_seconds": run.first_step_seconds}

    stopped = 0  # the number of the signal that stopped the run
    # The bar closes however the loop ends, so that an error line never lands on it.
    # The reader stops with the loop, however it ends (a checkpoint after it still saves the batches it read).
    with StopSignal() as stop, tqdm(total=total_steps, initial=step, disable=not main, dynamic_ncols=True,
                                    desc=out.name) as bar, _lost_process_line(accelerator, out, lambda: step), \
            contextlib.closing(run.batches):
        while step < total_steps:
            micro_batches = [next(run.batches) for _ in range(run.accumulation)]
            lr = run.scheduler.get_last_lr()[0]  # this step's: the scheduler moves on at its end
            loss, grad_norm, step_tokens = optimizer_step(cfg, accelerator, run.model, run.forward, run.optimizer,
                                                          run.scheduler, micro_batches, run.guard, step + 1)
            window_loss += loss
            window_steps += 1
            window_grad_norm = torch.maximum(window_grad_norm, grad_norm)
            new_tokens += step_tokens
            step += 1
            bar.update(1)
            if run.train_clock is None:  # this process's first step holds torch.compile's compilation: timed apart
                loss.item()  # waits for the device, once
                run.first_step_seconds += time.perf_counter() - started
                run.train_clock = time.perf_counter()
                # From the command to a trained step: what a user waits before the run shows it works.
                run.launch_to_first_step_s = time.time() - psutil.Process().create_time()
                accelerator.print(f"first step done {run.launch_to_first_step_s:.1f} s after launch")

            if step % cfg.log_every == 0 or step == total_steps:
                # The only host syncs in the loop, every log_every steps.
                loss_value = window_loss.item() / window_steps
                window_tokens = tokens_now() - tokens
                tokens = tokens_now()
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "tokens": tokens, "loss": loss_value, "lr": lr,
                       "grad_norm": window_grad_norm.item(), "tokens_per_s": window_tokens / elapsed,
                       **speed_fields(run, window_tokens / elapsed, flops, peak, step,
                                      (time.perf_counter() - started) / (step - first_step + 1))}
                run.metrics.write(row)
                accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}",
                                mfu="–" if row["mfu"] is None else f"{row['mfu']:.1%}",
                                mem=f"{row['peak_memory_gib']:.1f}G", eta=duration(row["eta_s"]))
                check_finite(run)
                window_loss.zero_()
                window_steps = 0
                window_grad_norm.zero_()
                window_start = time.perf_counter()
            paused = time.perf_counter()
            if run.eval_every and step % run.eval_every == 0 and step < total_steps:
                evaluate_and_log(run, step, tokens_now())
                if run.target:  # stop_at_val_loss reached: the run ends here, as at its last step
                    break
            # At the last step the run finishes anyway, with final/ and the checkpoint that says it is complete.
            stop_now = step < total_steps and _agreed(stop.received, accelerator, step % cfg.log_every == 0)
            if (cfg.save_every and step % cfg.save_every == 0 and step < total_steps) or stop_now:
                path = checkpoint(run, progress_now())
                if stop_now:
                    bar.close()
                    accelerator.print(f"stopped by signal at step {step}; checkpoint {path}; "
                                      f"continue with --resume")
                    stopped = stop_now
                    break
            # tokens_per_s measures training: the clock stops while evaluating and saving
            window_start += time.perf_counter() - paused
    return finish(run, progress_now(), started, stopped, final_name, info or {}, mark_final)


# What a collective raises when another process of the run has died (kill -9, out of memory, a lost machine):
# gloo's "Connection reset by peer" / "Connection closed by peer" are plain RuntimeErrors, NCCL's DistBackendError.
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted")


@contextlib.contextmanager
def _lost_process_line(accelerator, out: Path, step):
    """A collective that fails because another process died becomes one line on every survivor (the launcher
    then stops them all and names the process that died) instead of a traceback of the all-reduce."""
    try:
        yield
    except RuntimeError as e:
        lost = isinstance(e, torch.distributed.DistError) or any(s in str(e) for s in LOST_PEER)
        if accelerator.num_processes == 1 or not lost:
            raise
        saved = checkpoint_dirs(out)
        what = next((s for s in LOST_PEER if s in str(e)), first_line(e)[:80])
        raise UserError(f"another process of this run stopped during step {step() + 1} ({type(e).__name__}: {what}); "
                        f"every process stops. Continue with --resume on {accelerator.num_processes} processes"
                        + (f": it starts from {saved[-1]}" if saved else ": no checkpoint was written yet")) from None


def speed_fields(run: Run, tokens_per_s: float, flops: float, peak: float | None, step: int,
                 seconds_per_step: float) -> dict:
    """The log row's MFU (None where the device's peak is unknown: hf_gpt.throughput.PEAK_FLOPS), peak memory
    and the time left at the run's pace so far, evaluations and checkpoints included."""
    processes = run.accelerator.num_processes
    return {"mfu": tokens_per_s * flops / (peak * processes) if peak else None,
            "peak_memory_gib": peak_memory_gib(run.accelerator.device),
            "eta_s": (run.total_steps - step) * seconds_per_step}


@dataclass
class Run:
    """What set_up() prepared for the loop, and where the loop starts: `progress` holds the step, the tokens
    and the open log window (a checkpoint's, when resumed)."""

    cfg: object
    accelerator: Accelerator
    output_dir: Path
    tokenizer: object
    model: torch.nn.Module
    forward: object  # the model's forward, compiled or not
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: object  # data.train_batches(): an iterator with state_dict()/load_state_dict()
    eval_set: list[dict]
    guard: FiniteGuard
    metrics: MetricsLog
    byte_lengths: torch.Tensor
    accumulation: int
    tokens_per_step: int
    total_steps: int
    eval_every: int
    progress: dict
    last_eval: dict = field(default_factory=dict)
    eval_step: int = -1  # the step last evaluated
    target: dict = field(default_factory=dict)  # where stop_at_val_loss was reached: time_to_target's figures
    # The clocks of time to target. Each process's first step (compilation) is timed apart, and the training clock
    # starts when it ends; evaluation and checkpoints are timed apart too. Earlier sessions' seconds are in progress.
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    first_step_seconds: float = 0.0
    train_clock: float | None = None
    eval_tasks: list[EvalTask] = field(default_factory=list)  # run in turn at every evaluation
    seq_len: int = 0  # of a training micro-batch
    launch_to_first_step_s: float | None = None  # from launch to the end of the first step this process trained

    def train_seconds(self) -> float:
        """Seconds spent training, in every session of the run: evaluation, checkpoints and first steps left out."""
        since = 0.0 if self.train_clock is None else (
            time.perf_counter() - self.train_clock - self.eval_seconds - self.checkpoint_seconds)
        return self.progress.get("train_seconds", 0.0) + since


def set_up(cfg, model, tokenizer, data, accelerator: Accelerator) -> Run:
    """Everything before the first step, in an order that stops a bad run before it builds or writes anything:
    folders recovered, a resume checked against the run's config.yaml, the run's length from the data's batch
    shape, the validation set read, then the model, optimizer and schedule prepared, the checkpoint loaded,
    config.yaml written and the trackers started."""
    out = Path(cfg.output_dir)
    main = accelerator.is_main_process
    batches = data.train_batches(accelerator.process_index, accelerator.num_processes)
    if main:
        recover_folders(out)
    accelerator.wait_for_everyone()
    checkpoints = checkpoint_dirs(out)
    resume_from = checkpoints[-1] if cfg.resume and checkpoints else None
    # Before anything is built: another config would load the checkpoint into another run.
    changes = check_resumable(cfg, out, resume_from, accelerator.num_processes) if resume_from else []

    # The batch shape (for the accumulation count) comes from the data itself.
    batches = ReadAhead(batches, cfg.read_ahead)
    example = batches.first
    accum = accumulation_steps(cfg, example["input_ids"].numel(), accelerator.num_processes)
    tokens_per_step = example["input_ids"].numel() * accum * accelerator.num_processes
    # Data of known size (SFT, LoRA) says how many steps a pass over it takes; a streamed corpus cannot.
    epoch = data.steps_per_epoch(accelerator.num_processes, accum) if hasattr(data, "steps_per_epoch") else None
    total_steps = run_length(cfg, tokens_per_step, epoch)
    # Read before anything is built or written, so that an empty or broken validation split stops the
    # run at once, not at its first evaluation.
    eval_set = data.eval_batches(accelerator.process_index, accelerator.num_processes)
    eval_tasks = evaluation_tasks(cfg, tokenizer, accelerator)
    model, forward, optimizer, scheduler = prepare_training(cfg, model, accelerator, total_steps)
    # start_run seeded every process alike, so the recipe built the same initial weights (and LoRA
    # adapters) everywhere: DDP broadcasts rank 0's anyway, but FSDP2 keeps each process's own shard.
    # From here the RNG draws dropout masks, which must differ between processes, or every process drops
    # the same units of its batch. A resumed run then restores each process's own RNG state.
    set_seed(cfg.seed, device_specific=True)
    guard = FiniteGuard(model, accelerator, optimizer)

    progress = {"step": 0, "tokens": 0}
    if resume_from:
        progress = load_checkpoint(accelerator, resume_from, batches)
        accelerator.print(f"resumed from {resume_from} at step {progress['step']}"
                          + (f" (changed: {', '.join(changes)})" if changes else ""))
        if progress["step"] > total_steps:
            raise UserError(f"{resume_from} is past this run's {total_steps} steps; resume with a longer "
                            "--max_steps or --max_tokens")
    elif cfg.resume:
        accelerator.print(f"no checkpoint in {out / CHECKPOINTS}: starting from scratch")

    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    metrics.truncate_after(progress["step"])  # rows a killed run wrote past its last checkpoint
    run = Run(cfg, accelerator, out, tokenizer, model, forward, optimizer, scheduler, batches, eval_set, guard,
              metrics, token_byte_lengths(tokenizer, accelerator.unwrap_model(model).config.vocab_size), accum,
              tokens_per_step, total_steps, cfg.eval_every or (max(1, round(epoch)) if epoch else 0), progress,
              first_step_seconds=progress.get("first_step_seconds", 0.0), eval_tasks=eval_tasks,
              seq_len=example["input_ids"].shape[1])
    run.eval_tasks.insert(0, ValidationLoss(run))
    if progress["step"] < total_steps:  # a finished run, resumed, changes nothing
        if main and not resume_from:  # a resumed run keeps the config it was started with
            save_config(cfg, out / "config.yaml")
        if cfg.report_to:
            accelerator.init_trackers(out.name, config={k: v for k, v in asdict(cfg).items()
                                                        if not isinstance(v, list)})
        accelerator.print(f"training {total_steps} steps x {tokens_per_step:,} tokens "
                          f"(micro-batch {example['input_ids'].shape[0]} x {example['input_ids'].shape[1]}, "
                          f"accumulation {accum}, processes {accelerator.num_processes})")
    return run


class ValidationLoss:
    """The loop's own evaluation task (hf_gpt.evaluation.EvalTask): loss, perplexity and bits per byte of the
    validation set, each process its share (`evaluate`)."""

    name = "validation"

    def __init__(self, state: Run):
        self.state = state

    def run(self, model, accelerator) -> dict:
        state = self.state
        return evaluate(model, state.eval_set, state.byte_lengths, state.cfg.attn_implementation, accelerator)

    def report(self, fields: dict) -> str:
        if "val_loss" not in fields:
            return ""
        return f"val_loss {fields['val_loss']:.4f}  ppl {fields['val_ppl']:.2f}  bpb {fields['val_bpb']:.4f}"


def evaluation_tasks(cfg, tokenizer, accelerator) -> list[EvalTask]:
    """What every evaluation measures besides the validation loss, read before anything is built (a missing
    HellaSwag file stops the run in seconds)."""
    tasks: list[EvalTask] = []
    if cfg.hellaswag:
        if accelerator.distributed_type == DistributedType.FSDP:
            raise UserError("hellaswag is not scored under FSDP (processes score shares of different lengths); "
                            "score the final model with scripts/compare.py --hellaswag")
        tasks.append(HellaSwag(cfg.hellaswag, tokenizer, items=cfg.hellaswag_items, batch_size=cfg.micro_batch_size))
    if cfg.sample_prompts:
        tasks.append(Samples(tokenizer, cfg.sample_prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
    return tasks


def run_length(cfg, tokens_per_step: int, steps_per_epoch: float | None) -> int:
    """Optimizer steps of the run: max_steps; else max_tokens / tokens per step; else epochs x the steps of a
    pass over the data, for data of known size."""
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.max_tokens:
        steps = cfg.max_tokens // tokens_per_step
    elif cfg.epochs and not steps_per_epoch:
        raise UserError("epochs needs data of known size (SFT, LoRA); a streamed corpus takes max_steps or max_tokens")
    else:  # round(): 3 x (7 / 3) must give 7 steps, not 8
        steps = math.ceil(round(cfg.epochs * (steps_per_epoch or 0), 6))
    if steps <= 0:
        raise UserError("set max_steps, max_tokens or epochs to a positive number")
    return steps


def check_finite(run: Run) -> None:
    """Stops the run, in one line, if a step since the last check was not finite (FiniteGuard; a host sync)."""
    error = run.guard.failure(run.accumulation, run.output_dir)
    if error:
        raise UserError(error)


def evaluate_and_log(run: Run, step: int, tokens: int) -> None:
    """Every evaluation task of the run (validation loss, HellaSwag, samples) at `step`, each timed, into
    metrics.jsonl, the trackers and the console."""
    cfg, accelerator = run.cfg, run.accelerator
    check_finite(run)  # also waits for the device, so that the training clock reads true
    train_seconds = run.train_seconds()
    began = time.perf_counter()
    model = accelerator.unwrap_model(run.model)
    was_training = model.training
    model.eval()
    row, seconds, lines = {"step": step, "tokens": tokens}, {}, []
    for task in run.eval_tasks:
        start = time.perf_counter()
        fields = task.run(model, accelerator)
        seconds[task.name] = time.perf_counter() - start
        row.update(fields)
        line = task.report(fields)
        if line:
            lines.append(line if task.name == "samples" else f"{line}  ({seconds[task.name]:.1f} s)")
    model.train(was_training)
    # The figures (not the samples' text), for summary.json and the trackers.
    run.last_eval = {k: v for k, v in row.items() if isinstance(v, float)}
    run.eval_step = step
    row.update(eval_seconds=seconds, train_s=train_seconds)
    run.metrics.write(row)
    accelerator.log(run.last_eval, step=step)
    if accelerator.is_main_process and run.last_eval:
        tqdm.write(f"step {step}: " + "\n".join(lines))
    run.eval_seconds += time.perf_counter() - began
    if cfg.stop_at_val_loss and not run.target and run.last_eval.get("val_loss", math.inf) <= cfg.stop_at_val_loss:
        run.target = {"step": step, "tokens": tokens, "val_loss": run.last_eval["val_loss"], "train_s": train_seconds,
                      "first_step_s": run.first_step_seconds, "eval_s": run.eval_seconds,
                      "checkpoint_s": run.checkpoint_seconds}
        accelerator.print(f"step {step}: val_loss {run.last_eval['val_loss']:.4f} <= stop_at_val_loss "
                          f"{cfg.stop_at_val_loss} after {train_seconds:.1f} s of training")


def checkpoint(run: Run, progress: dict) -> Path:
    """save_checkpoint() with `progress`, once the steps before it are known to be finite: nothing trained after
    a non-finite step is ever saved."""
    check_finite(run)
    began = time.perf_counter()
    with unwritable_as_error(f"checkpoint step {progress['step']}", run.output_dir):
        path = save_checkpoint(run.accelerator, run.output_dir, progress, run.batches, run.cfg.keep_checkpoints)
    run.checkpoint_seconds += time.perf_counter() - began
    return path


def finish(run: Run, progress: dict, started: float, stopped: int, final_name: str, info: dict,
           mark_final=None) -> RunResult:
    """The end of a run at `progress`: unless stopped by a signal, a last evaluation and <final_name>/; then
    summary.json and loss.png; then, last, the checkpoint whose presence at the last step says all of those
    are complete."""
    out, accelerator, step, tokens = run.output_dir, run.accelerator, progress["step"], progress["tokens"]
    if not stopped and run.eval_step != step:  # a run stopped at its target was evaluated at this step
        evaluate_and_log(run, step, tokens)
    train_seconds = run.train_seconds()
    if not stopped:
        with unwritable_as_error(f"{final_name}/", out):
            save_final(accelerator, run.model, run.tokenizer, out / final_name, mark_final)
    wall = time.perf_counter() - started
    if accelerator.is_main_process:
        result = {"steps": step, "tokens": tokens, "wall_time_s": wall, "eval_time_s": run.eval_seconds,
                  "train_time_s": train_seconds, "first_step_time_s": run.first_step_seconds,
                  "launch_to_first_step_s": run.launch_to_first_step_s, "checkpoint_time_s": run.checkpoint_seconds,
                  "tokens_per_step": run.tokens_per_step, "eval": run.last_eval}
        if run.cfg.stop_at_val_loss:
            result["time_to_target"] = time_to_target(run)
        summary = run_summary(run.cfg, accelerator, result, info)
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        run.metrics.plot(out / "loss.png")
    if not stopped:
        checkpoint(run, {**progress, "target": run.target} if run.target else progress)
    accelerator.end_training()
    return RunResult(out, out / final_name, step, tokens, run.last_eval, bool(stopped), stopped)


def time_to_target(run: Run) -> dict:
    """Where the run first evaluated at or under stop_at_val_loss: its step, tokens and validation loss, and the
    seconds spent training until then, with those spent evaluating, saving checkpoints and in first steps (which
    hold compilation) beside them; all null where it was not reached."""
    reached = run.target or dict.fromkeys(("step", "tokens", "val_loss", "train_s", "first_step_s", "eval_s",
                                           "checkpoint_s"))
    return {"stop_at_val_loss": run.cfg.stop_at_val_loss, "reached": bool(run.target), **reached}


def _agreed(signum: int, accelerator, may_sync: bool) -> int:
    """A stop signal counts once any process got it, so that all of them save and leave together, and with
    the same number (the largest received), so that all of them exit with the same status.

    With several processes that takes a collective and a host sync, so it is only asked on log steps.
    """
    if accelerator.num_processes == 1:
        return signum
    if not may_sync:
        return 0
    return int(accelerator.gather(torch.tensor([signum], device=accelerator.device)).max().item())
