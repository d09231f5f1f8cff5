"""Measure training throughput through the engine's real optimizer step; prints one JSON line.

Every GPU figure comes with `vs_reference`: the ratio to a hand-written nanoGPT-style GPT-2 of the same
shapes (scripts/reference_gpt2.py), measured in the same process on the same batches.

    python scripts/benchmark.py --config configs/gpt2-small.yaml                      # random tokens, GPU speed
    python scripts/benchmark.py --config configs/gpt2-small.yaml --attn_implementation flex_attention \\
        --fused_cross_entropy --micro_batch_size 64
    python scripts/benchmark.py --config configs/gpt2-small.yaml --benchmark_data config  # the config's dataset, real loader
    python scripts/benchmark.py --config configs/gpt2-small.yaml --benchmark loader --dataset data/shards  # CPU side
    python scripts/benchmark.py --config configs/english-124m.yaml --benchmark loader --benchmark_steps 200 \
        --loader_step_ms 150 --read_ahead 64   # the loader under a simulated loop: does reading ahead hide it?
    python scripts/benchmark.py --config configs/gpt2-small.yaml --benchmark reference  # the yardstick alone

`--benchmark_data random` (the default for `--benchmark train`) feeds random tokens cut into documents of random
length, so the document mask is exercised exactly as with real data while the CPU does no work at all.
"""

import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402

from hf_gpt.config import PretrainConfig, UserError, load_config, run_cli  # noqa: E402
from hf_gpt.data import positions_from_eos  # noqa: E402
from hf_gpt.engine import accumulation_steps, optimizer_step, prepare_training  # noqa: E402
from hf_gpt.guard import FiniteGuard  # noqa: E402
from hf_gpt.model import build_model, varlen_kernel  # noqa: E402
from hf_gpt.start import start_run  # noqa: E402
from hf_gpt.throughput import flops_per_token  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # datasheet peak (SXM); the measured matmul ceiling here is ~798


@dataclass
class BenchmarkConfig(PretrainConfig):
    output_dir: str = "runs/benchmark"
    benchmark_data: str = field(default="random", metadata={"help": "train benchmark: random | config (the --dataset, real loader)"})
    benchmark: str = field(default="train", metadata={
        "help": "train (GPU step) | loader (data pipeline only) | reference (the hand-written GPT-2 alone)"})
    reference_tokens_per_s: float = field(default=0.0, metadata={
        "help": "The reference's figure from an earlier measurement on the same machine; 0: measure it here."})
    profile_steps: int = field(default=0, metadata={
        "help": "Profile this many steps after timing (the reference: 3); kernels by time into output_dir."})
    benchmark_steps: int = 10
    benchmark_warmup_steps: int = 3
    mean_document_tokens: int = field(default=700, metadata={"help": "Random data: mean document length."})
    loader_step_ms: float = field(default=0.0, metadata={
        "help": "loader benchmark: a simulated training loop taking this long a micro-batch, 40% of it holding the "
                "GIL (launching kernels) and 60% not (waiting on the device); 0: the loader alone."})

    renamed: ClassVar[dict[str, str]] = {**PretrainConfig.renamed, "data": "benchmark_data"}


def random_batches(cfg, vocab_size: int, eos: int, count: int = 8) -> list[dict]:
    """Random tokens with EOS-started documents of geometric length; made once, replayed."""
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, min(vocab_size, eos + 1), (cfg.micro_batch_size, cfg.block_size), generator=g)
        starts = torch.rand(ids.shape, generator=g) < 1 / cfg.mean_document_tokens
        ids[starts] = eos
        batch = {"input_ids": ids, "labels": ids.clone()}
        if cfg.document_masking:
            batch["position_ids"] = positions_from_eos(ids, eos)
        batches.append(batch)
    return batches


def random_pool(cfg) -> tuple[list[dict], int, int]:
    """The random batches, the vocabulary size and the end-of-text id they use."""
    if not cfg.vocab_size:
        raise UserError("random data needs --vocab_size")
    eos = min(50256, cfg.vocab_size - 1)  # GPT-2's, or the last id of a smaller vocabulary
    return random_batches(cfg, cfg.vocab_size, eos), cfg.vocab_size, eos


def data_source(cfg):
    if cfg.benchmark == "train" and cfg.benchmark_data == "random":
        return None
    from hf_gpt.data import PretrainData
    from hf_gpt.loading import load_tokenizer

    data = PretrainData(cfg, tokenizer=None)
    data.tokenizer = load_tokenizer(data.tokenizer_name)
    return data


def benchmark_loader(cfg) -> dict:
    """The data pipeline's tokens/s; with loader_step_ms, the seconds a simulated loop takes over the batches
    (read in its thread, or read_ahead in one of their own) against the loop's work alone."""
    from hf_gpt.read_ahead import ReadAhead

    data = data_source(cfg)
    batches = ReadAhead(data.train_batches(0, 1), cfg.read_ahead)
    next(batches)  # opening files and the first tokenizer call stay out of the timing
    if cfg.read_ahead and cfg.loader_step_ms:
        time.sleep(cfg.read_ahead * cfg.loader_step_ms / 1e3)  # the reader fills up, as it would during compilation
    busy, wait = 0.4 * cfg.loader_step_ms / 1e3, 0.6 * cfg.loader_step_ms / 1e3
    start, tokens = time.perf_counter(), 0
    for _ in range(cfg.benchmark_steps):
        tokens += next(batches)["input_ids"].numel()
        if busy:
            end = time.perf_counter() + busy
            while time.perf_counter() < end:  # Python holding the GIL, as launching kernels does
                pass
            time.sleep(wait)  # the GIL released, as while waiting on the device
    seconds = time.perf_counter() - start
    batches.close()
    kind = "token shards (memmap)" if getattr(data, "shards", None) else "streamed + tokenized on the fly"
    result = {"benchmark": "loader", "source": cfg.dataset, "kind": kind, "read_ahead": cfg.read_ahead,
              "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    if cfg.loader_step_ms:
        result["loop_work_s"] = cfg.benchmark_steps * cfg.loader_step_ms / 1e3
    return result


def benchmark_train(cfg) -> dict:
    accelerator = start_run(cfg)
    cuda = accelerator.device.type == "cuda"
    reference = cfg.reference_tokens_per_s
    measure = cuda and not reference and accelerator.num_processes == 1  # the reference, here and now
    data = data_source(cfg)
    if data is None:
        pool, vocab, eos = random_pool(cfg)
        batches = (pool[i % len(pool)] for i in range(10**9))
    else:
        vocab, eos = len(data.tokenizer), data.tokenizer.eos_token_id
        batches = data.train_batches(0, 1)
        pool = [next(batches) for _ in range(8)] if measure else []
    accum = accumulation_steps(cfg, cfg.micro_batch_size * cfg.block_size, accelerator.num_processes)
    if measure:
        reference = measure_reference(cfg, pool, cfg.benchmark_steps, cfg.benchmark_warmup_steps, accum)
    model = build_model(cfg, vocab, eos)
    steps = cfg.benchmark_warmup_steps + cfg.benchmark_steps
    model, forward, optimizer, scheduler = prepare_training(cfg, model, accelerator, steps + cfg.profile_steps)
    guard = FiniteGuard(model, accelerator, optimizer)  # part of every training step, so part of its timing
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(number: int):
        return optimizer_step(cfg, accelerator, model, forward, optimizer, scheduler,
                              [next(batches) for _ in range(accum)], guard, number)[0]

    for number in range(1, cfg.benchmark_warmup_steps + 1):  # compilation and autotuning stay out of the timing
        step(number)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for number in range(cfg.benchmark_warmup_steps + 1, steps + 1):
        loss = step(number)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = cfg.benchmark_steps * accum * cfg.micro_batch_size * cfg.block_size * accelerator.num_processes
    tps = tokens / seconds
    if cfg.profile_steps:
        profile(lambda: [step(steps + 1 + i) for i in range(cfg.profile_steps)], Path(cfg.output_dir) / "profile.txt")
    import transformers

    return {
        "benchmark": "train", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "processes": accelerator.num_processes, "micro_batch_size": cfg.micro_batch_size,
        "block_size": cfg.block_size, "gradient_accumulation_steps": accum,
        "compile": cfg.compile, "compile_mode": cfg.compile_mode,
        "attn_implementation": cfg.attn_implementation,
        "varlen_kernel": varlen_kernel() if cfg.attn_implementation == "varlen" else None,
        "fused_cross_entropy": cfg.fused_cross_entropy,
        "document_masking": cfg.document_masking, "mixed_precision": accelerator.mixed_precision,
        "tokens_per_s": round(tps), "step_time_s": seconds / cfg.benchmark_steps,
        # per GPU against the reference's one GPU
        "vs_reference": round(tps / accelerator.num_processes / reference, 4) if reference else None,
        "reference_tokens_per_s": round(reference) if reference else None,
        "mfu_vs_989_tflops": tps * flops_per_token(accelerator.unwrap_model(model), cfg.block_size) / (H100_BF16_DENSE_TFLOPS * 1e12)
        / accelerator.num_processes,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "last_loss": loss.item(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def measure_reference(cfg, batches, steps: int, warmup: int, accumulation: int) -> float:
    from reference_gpt2 import measure  # scripts/ is on the path: this file's own folder

    to_file = Path(cfg.output_dir) / "profile_reference.txt"
    tokens_per_s = measure(cfg, batches, steps, warmup, accumulation,
                           profile=(lambda run: profile(run, to_file)) if cfg.profile_steps else None)
    gc.collect()  # the reference's model, optimizer state and activations leave the GPU to the engine
    torch.cuda.empty_cache()
    return tokens_per_s


def benchmark_reference(cfg) -> dict:
    if not torch.cuda.is_available():
        raise UserError("the reference benchmark needs a GPU")
    accum = accumulation_steps(cfg, cfg.micro_batch_size * cfg.block_size, 1)
    pool, _, _ = random_pool(cfg)
    tps = measure_reference(cfg, pool, cfg.benchmark_steps, cfg.benchmark_warmup_steps, accum)
    return {"benchmark": "reference", "device": torch.cuda.get_device_name(), "micro_batch_size": cfg.micro_batch_size,
            "block_size": cfg.block_size, "gradient_accumulation_steps": accum, "tokens_per_s": round(tps),
            "torch": torch.__version__}


def profile(run, path: Path) -> None:
    """The kernels of `run()` by total time, into `path` and (the top rows) onto stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    with torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    # By self time: every kernel counted once, not again under each operator that launched it.
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=150,
                                      max_name_column_width=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print("\n".join(table.splitlines()[:30]), file=sys.stderr)


def main():
    cfg = load_config(BenchmarkConfig, description=__doc__)
    run = {"loader": benchmark_loader, "train": benchmark_train, "reference": benchmark_reference}.get(cfg.benchmark)
    if run is None:
        raise UserError(f"--benchmark must be train, loader or reference, not {cfg.benchmark!r}")
    result = run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:  # one line per run, also when every process measured
        print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
