"""FiniteGuard: a step whose loss or gradients are not finite never reaches the weights, and the run stops in
one line that says where the first non-finite value appeared."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from .checkpoints import checkpoint_dirs


class FiniteGuard:
    """Stops a run whose loss or gradients stop being finite, before a non-finite value reaches the weights.

    One inf gradient is enough: clipping scales every gradient by max_norm / inf = 0 and inf x 0 is NaN,
    and AdamW writes NaN into every weight. So every step is checked before the optimizer steps, but on
    the device: reading a flag on the host every step would wait for the GPU and leave its queue empty.
    A step whose loss or gradient norm (the same on all processes) is not finite is skipped (a fused
    AdamW's found_inf flag) or has its gradients zeroed (AdamW then only decays its moments): either way
    the weights stay finite, and the first such step is recorded on the device. The host reads the record where it waits for the GPU anyway: on log
    steps and before evaluating or saving, so nothing trained after the failure is ever saved.
    Each micro-batch's loss and accumulated gradients are checked as well (one fused norm per
    micro-batch), to say where the first non-finite value appeared: by then the step's gradients are gone.
    """

    def __init__(self, model, accelerator, optimizer=None):
        self.accelerator = accelerator
        self.params = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        # fp16's gradient scaler overflows gradients on purpose to find its scale, and skips those steps itself.
        self.check_gradients = accelerator.scaler is None
        # A fused Adam(W) skips a whole update when its `found_inf` flag (on the device) is set: the flag fp16's
        # GradScaler uses. One value to write instead of a masked fill per parameter tensor (1% of a step).
        # optim.MuonAdamW is an AdamW whose Muon groups honour the flag as well.
        inner = getattr(optimizer, "optimizer", optimizer)
        self.fused = inner if isinstance(inner, torch.optim.Adam) and inner.defaults.get("fused") else None
        device = accelerator.device
        # The first step whose loss or gradient norm is not finite: step, loss, gradient norm.
        self.failed = torch.full((3,), -1.0, dtype=torch.float64, device=device)
        # This process's first non-finite micro-batch: step, micro-batch, parameter (-1: only the loss).
        self.first_bad = torch.full((3,), -1, dtype=torch.long, device=device)

    def _grads(self) -> list[torch.Tensor]:
        # FSDP2 holds gradients as DTensors: check this process's shard. Before the step's last micro-batch
        # it may hold none yet (they are materialised when reduced).
        grads = [p.grad for _, p in self.params]
        if any(g is None for g in grads):
            return []
        return [g.to_local() if isinstance(g, DTensor) else g for g in grads]

    def check_micro_batch(self, step: int, index: int, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss)
        param = torch.full((), -1, device=loss.device)  # a non-finite loss is named first: it made the gradients so
        grads = self._grads() if self.check_gradients else []
        if grads:
            bad_params = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)))
            param = torch.where(bad_params.any() & ~bad, bad_params.int().argmax(), param)
            bad = bad | bad_params.any()
        here = torch.stack([torch.full_like(param, step), torch.full_like(param, index), param])
        self.first_bad = torch.where(bad & (self.first_bad[0] < 0), here, self.first_bad)

    def check_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Skips the update of a step whose loss or gradient norm is not finite, and records it."""
        ok = torch.isfinite(loss)
        if self.check_gradients:
            ok = ok & torch.isfinite(grad_norm)
            if self.fused is not None:
                self.fused.found_inf = (~ok).float()
            else:
                for g in self._grads():
                    g.masked_fill_(~ok, 0.0)
        here = torch.stack([torch.full_like(loss, step, dtype=torch.float64), loss.double(), grad_norm.double()])
        self.failed = torch.where(~ok & (self.failed[0] < 0), here, self.failed)

    def failure(self, accumulation: int, output_dir: Path) -> str | None:
        """The error line for the first non-finite step so far, if there was one (a host sync)."""
        step, loss, grad_norm = self.failed.tolist()
        if step < 0:
            return None
        # The failure path: syncs are fine. The micro-batch that went bad first may be another process's.
        records = [(r[1], process, r[2]) for process, r in enumerate(self.accelerator.gather(self.first_bad[None]).tolist())
                   if r[0] == step]
        where = ""
        if records:
            micro_batch, process, param = min(records)
            value = "the loss" if param < 0 else f"the gradient of {self.params[param][0]}"
            on = f" on process {process}" if self.accelerator.num_processes > 1 else ""
            where = f"; first non-finite: {value} after micro-batch {micro_batch + 1} of {accumulation}{on}"
        kept = checkpoint_dirs(output_dir)
        return (f"training diverged: loss {loss:.6g} at step {int(step)}, gradient norm {grad_norm:.6g}{where}; "
                f"nothing saved after {kept[-1] if kept else 'the start'}; lower --learning_rate, keep "
                "--max_grad_norm, or try --mixed_precision no")
