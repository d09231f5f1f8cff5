"""A hand-written GPT-2 and its training step, nanoGPT-style: the yardstick for scripts/benchmark.py.

Not part of the product: it exists so that every throughput figure is a ratio against what a short,
plain PyTorch program gets on the same GPU, measured back to back. Same shapes as GPT-2 124M (tied
embeddings, GELU-tanh, pre-LayerNorm), cuDNN/flash attention through sdpa with `is_causal=True` (no
document masking: the plain causal triangle), bf16 autocast, torch.compile, fused AdamW with weight
decay on matrices only, gradient clipping at 1.0.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        batch, length, d = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.ln_1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, d)
        x = x + self.proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class ReferenceGPT2(nn.Module):
    def __init__(self, vocab: int, length: int, layers: int, heads: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def measure(cfg, batches, steps: int, warmup: int, accumulation: int, profile=None) -> float:
    """Tokens per second of the reference's training step on `batches` (dicts with input_ids), after `warmup`
    steps that compile. One GPU. `profile(run)`, if given, is called with a function that runs 3 more steps."""
    device = torch.device("cuda")
    model = ReferenceGPT2(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), fused=True)
    compiled = torch.compile(model)
    # (inputs, targets) of the engine's shape, T tokens a row: the next token, wrapping at the row's end
    on_device = [(b["input_ids"].to(device), b["input_ids"].roll(-1, dims=1).to(device)) for b in batches]
    count = 0

    def step():
        nonlocal count
        for _ in range(accumulation):
            ids, targets = on_device[count % len(on_device)]
            count += 1
            with torch.autocast("cuda", torch.bfloat16):
                loss = compiled(ids, targets) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if profile:
        profile(lambda: [step() for _ in range(3)])
    return steps * accumulation * batches[0]["input_ids"].numel() / seconds
