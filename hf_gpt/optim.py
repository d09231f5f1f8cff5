"""The optimizers, chosen by name (OPTIMIZERS): AdamW with weight decay only where it belongs, and Muon for the
hidden matrices with AdamW for the rest; and the learning-rate schedules."""

from __future__ import annotations

import contextlib
import math

import torch
from accelerate import DistributedType
from torch import nn
# torch.optim.Muon's own pieces, used rather than copied: its step takes each parameter as one (out, in) matrix,
# and GPT-2's are (in, out) under Conv1D, or three matrices in one (c_attn). See MuonAdamW.
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler
from transformers.pytorch_utils import Conv1D

from .config import CHOICES, UserError, check_choice


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


def _adamw_groups(model: nn.Module, cfg, leave_out: set[int] = frozenset()) -> list[dict]:
    """AdamW's two groups, decayed and not, of the trainable parameters not in `leave_out` (ids)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in leave_out]
    decay = {n for n, _ in trainable} if cfg.weight_decay_everywhere else decay_parameter_names(model)
    return [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]


def _adamw_settings(model: nn.Module, cfg) -> dict:
    fused = all(p.is_cuda for p in model.parameters() if p.requires_grad)  # one kernel for the whole update on GPUs
    return {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon,
            "fused": fused or None}


def build_adamw(model: nn.Module, cfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(_adamw_groups(model, cfg), **_adamw_settings(model, cfg))


def hidden_matrices(model: nn.Module) -> dict[str, tuple[nn.Parameter, bool]]:
    """The weight matrices of the blocks' linear layers (attention c_attn/c_proj, MLP c_fc/c_proj), by name, each
    with whether it is held (in, out) as GPT-2's Conv1D holds it, not (out, in) as nn.Linear does. Not the
    embeddings nor the output head, tied or not: Muon is for hidden layers (Keller Jordan's post)."""
    head = model.get_output_embeddings()
    head = id(head.weight) if head is not None else None
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (Conv1D, nn.Linear)) and module.weight.requires_grad and id(module.weight) != head:
            found[f"{name}.weight"] = (module.weight, isinstance(module, Conv1D))
    return found


class MuonAdamW(torch.optim.AdamW):
    """torch.optim.Muon's update for the groups marked `muon`, AdamW for the others, as one optimizer: the engine,
    the schedule (one LambdaLR scales every group's rate) and the checkpoints (one state dict) see one, as in
    Keller Jordan's MuonWithAuxAdam.

    torch.optim.Muon scales each update by the matrix's shape read as (out, in), nn.Linear's layout; GPT-2's
    Conv1D holds (in, out). So each matrix is orthogonalised and scaled here in its (out, in) form, whichever
    layout it trains in (`transposed`), and as `blocks` matrices stacked along its outputs: c_attn's query, key
    and value apart (`muon_split_qkv`). The momentum, Newton-Schulz iteration and scale are torch's own; the
    matrices of one shape are orthogonalised together (`newton_schulz`).

    A non-finite step is skipped whole on the device, as a fused AdamW skips it: hf_gpt.guard.FiniteGuard sets
    `found_inf` and the Muon groups honour it too (weights, momentum and decay untouched), with no host sync.
    """

    @contextlib.contextmanager
    def _adamw_groups(self):
        """AdamW's own code sees its groups only: it reads an Adam state ("step") for every parameter it is given."""
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g["muon"]]
        try:
            yield
        finally:
            self.param_groups = groups

    def __setstate__(self, state):  # what load_state_dict calls
        torch.optim.Optimizer.__setstate__(self, state)
        with self._adamw_groups():
            super().__setstate__({"state": self.state, "param_groups": self.param_groups})

    @torch.no_grad()
    def step(self, closure=None):
        with self._adamw_groups():
            loss = super().step(closure)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group, found_inf)
        return loss

    def _muon_step(self, group: dict, found_inf) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        keep = None if found_inf is None else 1.0 - found_inf.float()  # 0 skips the step
        # The step's factors, once for every matrix; with keep 0 they leave momentum and weights as they were.
        mix = 1 - momentum if keep is None else (1 - momentum) * keep
        shrink = 1 - lr * decay if keep is None else 1 - lr * decay * keep
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if keep is not None:
            kept = keep > 0
            grads = [torch.where(kept, grad, 0.0) for grad in grads]
        for p, grad in zip(params, grads):
            if "momentum_buffer" not in self.state[p]:  # not setdefault: that would allocate one every step
                self.state[p]["momentum_buffer"] = torch.zeros_like(grad)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        # Every matrix at once through torch's foreach kernels: torch.optim.Muon's arithmetic, one call for all.
        torch._foreach_lerp_(bufs, grads, mix if keep is None else [mix] * len(bufs))  # a tensor weight: a list
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        torch._foreach_mul_(params, shrink)
        by_shape = {}  # (out, in) -> the blocks of that shape and their updates
        for p, update in zip(params, updates):
            # (out, in) views of the weight and its update, the blocks along the outputs
            weight, matrix = (p.T, update.T) if group["transposed"] else (p, update)
            for block, block_update in zip(weight.chunk(group["blocks"]), matrix.chunk(group["blocks"])):
                blocks, block_updates = by_shape.setdefault(tuple(block_update.shape), ([], []))
                blocks.append(block)
                block_updates.append(block_update)
        for shape, (blocks, block_updates) in by_shape.items():
            ortho = orthogonalise(block_updates)
            rate = _adjust_lr(lr, group["adjust_lr_fn"], shape)
            if keep is None:  # in place through the views: torch.optim.Muon's own arithmetic
                torch._foreach_add_(blocks, ortho.unbind(0), alpha=-rate)
            else:  # float: a bf16 product would round the update
                torch._foreach_sub_(blocks, (ortho.float() * (rate * keep)).unbind(0))


def orthogonalise(updates: list[torch.Tensor]) -> torch.Tensor:
    """`newton_schulz` of same-shape updates, as one stack. Data parallel, every process holds the same updates (DDP
    averaged the gradients), so each orthogonalises its share of the stack and the shares are gathered: a step's
    Newton-Schulz work divided among the processes, not repeated by each. On one H200, Muon's 65,536-token step of
    GPT-2 124M is 5.6% slower than AdamW's (459k against 485k tokens/s, docs/results/time-to-quality.md);
    gpt2-small.yaml's 2^19 tokens on eight GPUs are 65,536 a GPU, so whatever of that is repeated on each process
    stays that share of the step there, and eight near 7.6x one would be out of reach. Keller Jordan's Muon and
    modded-nanogpt give rank r the matrices r::world and all-gather the updated weights; here the bf16 updates are
    gathered (half the bytes) and every process keeps the whole momentum, so a checkpoint is the same on any number
    of processes. Exact: a share is orthogonalised as it would be in the whole stack (tested, two processes on a
    CPU)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    processes = torch.distributed.get_world_size() if distributed else 1
    if processes == 1:
        return newton_schulz(torch.stack(updates))
    share = -(-len(updates) // processes)  # ceil: the last processes may get fewer matrices, or none
    mine = updates[torch.distributed.get_rank() * share:][:share]
    piece = torch.zeros((share, *updates[0].shape), dtype=torch.bfloat16, device=updates[0].device)
    if mine:
        piece[:len(mine)] = newton_schulz(torch.stack(mine))
    gathered = piece.new_empty((share * processes, *piece.shape[1:]))
    # torch 2.13 renamed all_gather_into_tensor (the GPU image's torch 2.11 has only that name)
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(gathered, piece)
    return gathered[:len(updates)]


def newton_schulz(updates: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation (`_zeropower_via_newtonschulz`: its coefficients, steps and bf16
    arithmetic) of a stack of matrices of one shape, all at once: one batched product where torch's takes one
    matrix a call. GPT-2 124M has 72 matrices to orthogonalise a step; one at a time, each a few dozen small
    kernels launched from Python, the step was bound by the launches (and by the GIL a reader thread holds), not
    by the GPU. On a CPU the result is torch's bit for bit (tested)."""
    x = updates.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)  # a spectral norm of at most 1
    for _ in range(DEFAULT_NS_STEPS):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=DEFAULT_B, alpha=DEFAULT_C), x, beta=DEFAULT_A)
    return x.mT if tall else x


def build_muon(model: nn.Module, cfg) -> MuonAdamW:
    """Muon for the hidden matrices, AdamW (learning_rate, adam_*, weight_decay) for embeddings, LayerNorms and
    biases (and an untied head)."""
    if hasattr(model, "get_base_model"):
        raise UserError("optimizer muon is for a whole model's hidden matrices, not LoRA's low-rank adapters: "
                        "use --optimizer adamw")
    matrices = hidden_matrices(model)
    muon_groups = {}
    for name, (param, transposed) in matrices.items():
        # modded-nanogpt's first Muon record (records/track_1_short/2024-10-10_Muon/train_gpt2.py) splits
        # GPT-2's grouped QKV matrix into three before orthogonalising; nanochat holds c_q, c_k and c_v apart.
        blocks = 3 if cfg.muon_split_qkv and name.endswith("attn.c_attn.weight") else 1
        muon_groups.setdefault((transposed, blocks), []).append(param)
    groups = _adamw_groups(model, cfg, leave_out={id(p) for p, _ in matrices.values()})
    groups += [{"params": params, "muon": True, "transposed": transposed, "blocks": blocks,
                "lr": cfg.muon_learning_rate, "weight_decay": cfg.muon_weight_decay, "momentum": cfg.muon_momentum,
                "nesterov": cfg.muon_nesterov, "adjust_lr_fn": cfg.muon_adjust_lr}
               for (transposed, blocks), params in muon_groups.items()]
    for group in groups:
        group.setdefault("muon", False)
    return MuonAdamW(groups, **_adamw_settings(model, cfg))


# Optimizers by name (the `optimizer` field): each builds one torch optimizer for a model from the run's config.
OPTIMIZERS = {"adamw": build_adamw, "muon": build_muon}
MUON_SCALINGS = CHOICES["muon_adjust_lr"]  # torch.optim.Muon's adjust_lr_fn, checked with the other enumerated fields


def check_optimizer(cfg, distributed_type=None) -> None:
    """The optimizer's settings, before anything is built."""
    check_choice("optimizer", cfg.optimizer)  # config.check's rule, for configs built in code as well
    if cfg.optimizer == "muon":
        check_choice("muon_adjust_lr", cfg.muon_adjust_lr)
    if cfg.optimizer == "muon" and distributed_type == DistributedType.FSDP:
        raise UserError("optimizer muon does not run under FSDP: Muon orthogonalises each whole matrix and FSDP "
                        "gives each process a slice of it; use DDP (configs/accelerate/ddp.yaml) or --optimizer adamw")


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](model, cfg)


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
