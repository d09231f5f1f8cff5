"""AdamW with weight decay only where it belongs, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from .config import UserError


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the 2-D weight matrices that get weight decay.

    Biases and LayerNorm gains are 1-D; embeddings are 2-D but are lookup tables whose rare rows
    decay toward zero between their few updates, so they are left out too, as minGPT leaves them out
    (nanoGPT today decays every 2-D tensor, embeddings included). A tied lm_head shares the embedding's
    tensor and so is left out with it.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name for name, p in model.named_parameters()
            if p.requires_grad and p.ndim >= 2 and id(p) not in embeddings}


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = {n for n, _ in trainable} if cfg.weight_decay_everywhere else decay_parameter_names(model)
    groups = [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for _, p in trainable)  # one kernel for the whole update on GPUs
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=fused or None)


def build_scheduler(optimizer, cfg, total_steps: int) -> LambdaLR:
    """transformers' schedule with nanoGPT's warmup, (step + 1) / (warmup + 1) of the rate: transformers'
    warmup starts at 0, which spends the first step training nothing."""
    warmup = warmup_steps(cfg, total_steps)
    decay = _transformers_schedule(optimizer, cfg, total_steps, warmup).lr_lambdas[0]
    return LambdaLR(optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup else decay(step))


def warmup_steps(cfg, total_steps: int) -> int:
    """warmup_steps, or warmup_ratio of the run's steps: a share stays a share when a run is made longer or its
    steps larger (an ablation's "5% warmup" beside one that changes the tokens per step). Rounded up, as
    transformers' TrainingArguments does with a share (after rounding off float noise: 0.3 x 10 is 3, not 4)."""
    return cfg.warmup_steps or math.ceil(round(cfg.warmup_ratio * total_steps, 6))


def _transformers_schedule(optimizer, cfg, total_steps: int, warmup: int):
    if cfg.lr_scheduler == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, warmup, total_steps,
                             scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})
    if cfg.lr_scheduler == "wsd":  # warmup, long stable plateau, short decay: lets a run be extended
        return get_scheduler("warmup_stable_decay", optimizer, warmup, total_steps,
                             scheduler_specific_kwargs={"num_decay_steps": max(1, int(cfg.decay_ratio * total_steps)),
                                                        "min_lr_ratio": cfg.min_lr_ratio})
    if cfg.lr_scheduler == "constant":
        return get_scheduler("constant_with_warmup", optimizer, warmup, total_steps)
    if cfg.lr_scheduler == "linear":
        return get_scheduler("linear", optimizer, warmup, total_steps)
    raise UserError(f"lr_scheduler must be cosine, wsd, constant or linear, not '{cfg.lr_scheduler}'")
