"""Measure training throughput through the engine's real optimizer step; prints one JSON line.

    python scripts/benchmark.py --config configs/gpt2-small.yaml                      # random tokens, GPU speed
    python scripts/benchmark.py --config configs/gpt2-small.yaml --attn_implementation flex_attention \\
        --fused_cross_entropy --micro_batch_size 64
    python scripts/benchmark.py --config configs/gpt2-small.yaml --benchmark_data config  # the config's dataset, real loader
    python scripts/benchmark.py --config configs/gpt2-small.yaml --benchmark loader --dataset data/shards  # CPU side

`--benchmark_data random` (the default for `--benchmark train`) feeds random tokens cut into documents of random
length, so the document mask is exercised exactly as with real data while the CPU does no work at all.
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402

from hf_gpt.config import PretrainConfig, UserError, load_config, run_cli  # noqa: E402
from hf_gpt.data import positions_from_eos  # noqa: E402
from hf_gpt.engine import FiniteGuard, accumulation_steps, optimizer_step, prepare_training, start_run  # noqa: E402
from hf_gpt.model import build_model  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # datasheet peak (SXM); the measured matmul ceiling here is ~798


@dataclass
class BenchmarkConfig(PretrainConfig):
    output_dir: str = "runs/benchmark"
    benchmark_data: str = field(default="random", metadata={"help": "train benchmark: random | config (the --dataset, real loader)"})
    benchmark: str = field(default="train", metadata={"help": "train (GPU step) | loader (data pipeline only)"})
    benchmark_steps: int = 10
    benchmark_warmup_steps: int = 3
    mean_document_tokens: int = field(default=700, metadata={"help": "Random data: mean document length."})

    renamed: ClassVar[dict[str, str]] = {**PretrainConfig.renamed, "data": "benchmark_data"}


def random_batches(cfg, vocab_size: int, eos: int, count: int = 8) -> list[dict]:
    """Random tokens with EOS-started documents of geometric length; made once, replayed."""
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, min(vocab_size, 50257), (cfg.micro_batch_size, cfg.block_size), generator=g)
        starts = torch.rand(ids.shape, generator=g) < 1 / cfg.mean_document_tokens
        ids[starts] = eos
        batch = {"input_ids": ids, "labels": ids.clone()}
        if cfg.document_masking:
            batch["position_ids"] = positions_from_eos(ids, eos)
        batches.append(batch)
    return batches


def flops_per_token(model, cfg) -> float:
    """6N for the weights (forward + backward) plus the attention scores, as in the PaLM paper's MFU."""
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def data_source(cfg):
    if cfg.benchmark == "train" and cfg.benchmark_data == "random":
        return None
    from hf_gpt.data import PretrainData
    from hf_gpt.loading import load_tokenizer

    data = PretrainData(cfg, tokenizer=None)
    data.tokenizer = load_tokenizer(data.tokenizer_name)
    return data


def benchmark_loader(cfg) -> dict:
    data = data_source(cfg)
    batches = data.train_batches(0, 1)
    next(batches)  # opening files and the first tokenizer call stay out of the timing
    start, tokens = time.perf_counter(), 0
    for _ in range(cfg.benchmark_steps):
        tokens += next(batches)["input_ids"].numel()
    seconds = time.perf_counter() - start
    kind = "token shards (memmap)" if getattr(data, "shards", None) else "streamed + tokenized on the fly"
    return {"benchmark": "loader", "source": cfg.dataset, "kind": kind, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def benchmark_train(cfg) -> dict:
    accelerator = start_run(cfg)
    data = data_source(cfg)
    if data is None:
        if not cfg.vocab_size:
            raise UserError("random data needs --vocab_size")
        vocab, eos = cfg.vocab_size, 50256
        pool = random_batches(cfg, vocab, eos)
        batches = (pool[i % len(pool)] for i in range(10**9))
    else:
        vocab, eos = len(data.tokenizer), data.tokenizer.eos_token_id
        batches = data.train_batches(0, 1)
    model = build_model(cfg, vocab, eos)
    accum = accumulation_steps(cfg, cfg.micro_batch_size * cfg.block_size, accelerator.num_processes)
    steps = cfg.benchmark_warmup_steps + cfg.benchmark_steps
    model, forward, optimizer, scheduler = prepare_training(cfg, model, accelerator, steps)
    guard = FiniteGuard(model, accelerator)  # part of every training step, so part of its timing
    model.train()
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for step in range(steps):
        if step == cfg.benchmark_warmup_steps:  # compilation and autotuning stay out of the timing
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _, _ = optimizer_step(cfg, accelerator, model, forward, optimizer, scheduler,
                                    [next(batches) for _ in range(accum)], guard, step + 1)
        losses.append(loss)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = cfg.benchmark_steps * accum * cfg.micro_batch_size * cfg.block_size * accelerator.num_processes
    tps = tokens / seconds
    import transformers

    result = {
        "benchmark": "train", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "processes": accelerator.num_processes, "micro_batch_size": cfg.micro_batch_size,
        "block_size": cfg.block_size, "gradient_accumulation_steps": accum,
        "compile": cfg.compile, "compile_mode": cfg.compile_mode,
        "attn_implementation": cfg.attn_implementation, "fused_cross_entropy": cfg.fused_cross_entropy,
        "document_masking": cfg.document_masking, "mixed_precision": accelerator.mixed_precision,
        "tokens_per_s": round(tps), "step_time_s": seconds / cfg.benchmark_steps,
        "mfu_vs_989_tflops": tps * flops_per_token(accelerator.unwrap_model(model), cfg) / (H100_BF16_DENSE_TFLOPS * 1e12)
        / accelerator.num_processes,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "last_loss": losses[-1].item(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    return result


def main():
    cfg = load_config(BenchmarkConfig, description=__doc__)
    result = benchmark_loader(cfg) if cfg.benchmark == "loader" else benchmark_train(cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
