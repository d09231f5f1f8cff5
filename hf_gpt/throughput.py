"""What a run reports of its speed besides tokens per second: FLOPs per token, model FLOPs utilisation (MFU)
against the device's peak, peak memory and the time left."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16/fp16 tensor-core peaks from the datasheets (FLOP/s per device), by a name torch reports. MFU is
# measured against these whatever the run's precision, as nanoGPT measures against an A100's 312e12.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM; also GH200
    "H200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N (forward and backward through every weight) plus the attention scores,
    12 x layers x width x sequence length, as nanoGPT and llm.c count them (and the PaLM paper's MFU). The
    attention term is that of full causal rows; with document masking fewer scores are computed."""
    config = model.config
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s from PEAK_FLOPS; None for a CPU or a GPU not in the table (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """The most memory this process held so far: on a GPU what torch allocated there, on a CPU the process's
    peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def duration(seconds: float) -> str:
    """'1:02:03' for a progress line; days spelt out."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text
