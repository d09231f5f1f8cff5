"""Validation loss of several runs on one chart, against tokens seen or seconds of training (from each run's
metrics.jsonl; the seconds are the engine's training clock, evaluations and checkpoints left out).

    python scripts/plot_curves.py runs/english-124m runs/seed-english --out curves.png
    python scripts/plot_curves.py runs/a runs/b --labels "ours" "the article's" --x seconds --target 4.33 --out t.png

--tokens_per_s gives a run's seconds as its tokens over a rate measured elsewhere (one figure per run, 0: its own
clock): for a run whose clock is not its own, such as one that shared its GPU.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from hf_gpt.config import ScriptParser, UserError, run_cli  # noqa: E402
from hf_gpt.metrics_log import MetricsLog  # noqa: E402


def main():
    parser = ScriptParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="Run folders (each with metrics.jsonl).")
    parser.add_argument("--labels", nargs="+", help="One label per run (default: the folder names).")
    parser.add_argument("--out", default="curves.png")
    parser.add_argument("--title", default="")
    parser.add_argument("--x", choices=["tokens", "seconds"], default="tokens", help="What the horizontal axis counts.")
    parser.add_argument("--target", type=float, default=0.0, help="A validation loss to draw as a line (0: none).")
    parser.add_argument("--tokens_per_s", nargs="+", type=float,
                        help="With --x seconds, one rate per run: seconds = tokens / rate (0: the run's own clock).")
    args = parser.parse_args()
    labels = args.labels or [Path(r).name for r in args.runs]
    rates = args.tokens_per_s or [0.0] * len(args.runs)
    for name, values in (("--labels", labels), ("--tokens_per_s", rates)):
        if len(values) != len(args.runs):
            raise UserError(f"{name}: {len(values)} values for {len(args.runs)} runs")
    curves = {}
    for run, label, rate in zip(args.runs, labels, rates):
        rows = MetricsLog(Path(run) / "metrics.jsonl").rows()
        # The horizontal axis: tokens; the run's own training clock; or its tokens over a rate measured elsewhere.
        key, scale = ("train_s", 1.0) if args.x == "seconds" and not rate else ("tokens", 1 / rate if rate else 1.0)
        points = [(r[key] * scale, r["val_loss"]) for r in rows if "val_loss" in r and key in r]
        if not points:
            raise UserError(f"{run}: no validation rows in metrics.jsonl")
        curves[label] = points

    import matplotlib

    matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2 + 0.25 * len(curves)))
    for label, points in curves.items():
        xs, losses = zip(*points)
        ax.plot([x / 1e6 for x in xs] if args.x == "tokens" else xs, losses, "o-", markersize=3, label=label)
    if args.target:
        ax.axhline(args.target, color="grey", linestyle="--", linewidth=1, label=f"target {args.target}")
    ax.set_xlabel("tokens seen (millions)" if args.x == "tokens" else "seconds of training")
    ax.set_ylabel("validation loss (nats/token)")
    if args.title:
        ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)  # below: curves fill the plot
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
