"""A run's record: metrics.jsonl (one JSON object per line), the loss-curve PNG drawn from it, and what
summary.json says ran (run_summary: hardware, library versions, the code's commit)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path

from .config import UserError
from .files import atomic_write


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        """The rows written; a torn last line (the process was killed mid-write) is left out."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only the last line can be cut short by a crash
                    raise UserError(f"{self.path} line {i + 1} is not JSON: the file was edited or damaged") from None
        return rows

    def last_eval(self) -> dict:
        """The val_* figures of the last evaluation row ({} when there is none)."""
        return next(({k: v for k, v in r.items() if k.startswith("val_")}
                     for r in reversed(self.rows()) if "val_loss" in r), {})

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step`: a resumed run writes them again, so the log matches an uninterrupted run."""
        if self.enabled and self.path.exists():
            kept = [r for r in self.rows() if r.get("step", 0) <= step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self, png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt

        rows = self.rows()
        train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
        hellaswag = [(r["tokens"], r["hellaswag_acc_norm"]) for r in rows if "hellaswag_acc_norm" in r]
        fig, axes = plt.subplots(1, 2 if hellaswag else 1, figsize=(12 if hellaswag else 7, 4), squeeze=False)
        ax = axes[0, 0]
        for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        if hellaswag:  # llm.c's chart: HellaSwag against training, OpenAI's GPT-2 as the line to cross
            from .benchmarks import GPT2_124M_HELLASWAG_ACC_NORM, GPT2_124M_HELLASWAG_LABEL

            ax = axes[0, 1]
            ax.plot(*zip(*hellaswag), "o-", label="this run")
            ax.axhline(GPT2_124M_HELLASWAG_ACC_NORM, color="tab:red", linestyle="--", label=GPT2_124M_HELLASWAG_LABEL)
            ax.set_xlabel("tokens")
            ax.set_ylabel("HellaSwag acc_norm")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)


def run_summary(cfg, accelerator, result: dict, info: dict) -> dict:
    import accelerate
    import datasets
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    with contextlib.suppress(ImportError):
        import peft
        versions["peft"] = peft.__version__
    if torch.cuda.is_available():
        hardware = f"{accelerator.num_processes} x {torch.cuda.get_device_name()}"
    else:
        hardware = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {**info, **result, "hardware": hardware, "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "versions": versions, **code_version()}


REPO_ROOT = Path(__file__).resolve().parent.parent


def code_version(root: Path = REPO_ROOT) -> dict:
    """The commit of the code that ran and whether its checkout had changes (tracked or new files) besides it:
    None for both outside a git checkout of it (an installed copy) or without git. Never fails a run."""
    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD") if top and Path(top).resolve() == root.resolve() else None
    status = git("status", "--porcelain") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}
