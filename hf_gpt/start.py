"""The start of a run, before the recipe builds its tokenizer and model: the Accelerator, seeds and device
settings, the process tied to the launcher that started it, and the output folder locked for this run alone
(and left as it was found when the run writes nothing in it)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.util
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from .checkpoints import checkpoint_dirs
from .config import UserError
from .model import VARLEN_KERNEL_NAMES, use_varlen_kernel
from .optim import check_optimizer


# DDP all-reduces gradients in buckets (25 MB by default), and under torch.compile dynamo splits the compiled
# graph at every bucket boundary so that each bucket's all-reduce starts while the backward goes on: ~15
# graphs for GPT-2 124M in every micro-batch, `no_sync` or not, each boundary a lost fusion and more launches.
# 100 MB buckets make ~5; gradients kept as views into them skip a copy. Two H100s, measured together
# (docs/results/throughput.md): x one GPU 1.90 -> 1.93 at 8 micro-batches a step, 1.82 -> 1.85 at one.
DDP_BUCKETS = DistributedDataParallelKwargs(bucket_cap_mb=100, gradient_as_bucket_view=True)


def start_run(cfg) -> Accelerator:
    """Accelerator, seeds and output-folder checks, before the recipe builds its tokenizer and model."""
    out = Path(cfg.output_dir)
    stop_with_launcher()
    if checkpoint_dirs(out) and not cfg.resume:
        raise UserError(f"{out} already holds a run with checkpoints; pass --resume to continue it "
                        "or choose another --output_dir")
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision or None,
        log_with=cfg.report_to or None,
        project_dir=str(out),
        # Our schedule counts optimizer steps; by default Accelerate steps it once per process.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DDP_BUCKETS],
    )
    set_seed(cfg.seed)
    check_optimizer(cfg, accelerator.distributed_type)
    if accelerator.device.type == "cpu" and cfg.attn_implementation == "flex_attention":
        raise UserError("flex_attention trains on GPUs only (no backward on CPU); use --attn_implementation sdpa")
    if cfg.attn_implementation == "varlen":
        cuda = accelerator.device.type == "cuda"
        if cuda and importlib.util.find_spec("torch.nn.attention.varlen") is None:
            raise UserError(f"varlen attention needs torch 2.10 or later (this is {torch.__version__}); "
                            "use --attn_implementation flex_attention")
        kernel = use_varlen_kernel(cfg.varlen_kernel, accelerator.device)
        if cuda:  # on a CPU, varlen is sdpa with the documents' mask whatever the kernel (tests)
            accelerator.print(f"varlen attention: {VARLEN_KERNEL_NAMES[kernel]}")
    if accelerator.device.type == "cpu":
        # `accelerate launch` pins CPU runs to one thread (OMP_NUM_THREADS=1) unless its config says
        # otherwise, which halves the default run on a 2-core machine: use the cores this process may
        # run on, shared between processes.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cpus // accelerator.num_processes)
        if threads > torch.get_num_threads():
            torch.set_num_threads(threads)
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        lock_output_dir(out)
    return accelerator


# Set by `accelerate launch` (every launcher) and by torchrun for the processes they start.
LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_launcher() -> None:
    """Have the kernel send this process SIGTERM when the launcher that started it dies.

    `accelerate launch` with one process waits on its child and dies of SIGTERM without passing it on,
    which would leave the run training as an orphan (and a `--resume` beside it). With this, StopSignal
    saves a checkpoint and the run ends. torchrun passes signals on by itself; this covers its agent being
    killed outright. Only under a launcher: a run started from a shell keeps running when the shell exits
    (nohup).
    """
    if sys.platform == "linux" and any(name in os.environ for name in LAUNCHER_ENV):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Locks this process holds, by folder, kept open for its lifetime (tests start several runs in one process).
_output_locks: dict[Path, object] = {}


def lock_output_dir(out: Path) -> None:
    """Create output_dir and hold an exclusive lock on it: two runs writing one folder would mix their
    checkpoints and metrics. The kernel drops the lock when the process ends, however it ends, so a
    killed run never leaves its folder locked."""
    if out.resolve() in _output_locks:
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as e:
        raise UserError(f"cannot write in output_dir {out}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise UserError(f"{out} is in use by another run (process {holder or '?'}); wait for it to end or stop it "
                        "(kill -TERM saves a checkpoint), or choose another --output_dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _output_locks[out.resolve()] = lock
    atexit.register(_remove_if_unused, out, created)


def _remove_if_unused(out: Path, created: bool) -> None:
    """At exit, a run that failed before writing anything leaves no folder holding only its .lock behind (nor
    the folder, if it made it): the next start, or `ls runs/`, would take it for a run."""
    with contextlib.suppress(OSError):
        if [p.name for p in out.iterdir()] == [".lock"]:
            (out / ".lock").unlink()
            if created:
                out.rmdir()
