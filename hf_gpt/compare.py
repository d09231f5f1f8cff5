"""Models side by side on the same data: one model at a time through every task, then a table,
report.md, a chart and results.json (whose "models" part the Hub model card reads)."""

from __future__ import annotations

import gc
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .benchmarks import BENCHMARKS, DEFAULT_TEXT, RUNNERS, load_benchmark, text_documents
from .config import UserError
from .evaluation import heldout_loss
from .generation import generate_ids
from .loading import context_length, load_model

# (key in results.json, label, higher is better), in the order of the table.
METRICS = [
    ("val_loss", "held-out loss (nats/token)", False),
    ("val_ppl", "held-out perplexity", False),
    ("val_bpb", "held-out bits per byte", False),
    ("hellaswag_acc", "HellaSwag acc", True),
    ("hellaswag_acc_norm", "HellaSwag acc_norm", True),
    ("lambada_acc", "LAMBADA acc", True),
    ("lambada_ppl", "LAMBADA perplexity", False),
    ("wikitext_word_ppl", "WikiText word perplexity", False),
    ("wikitext_bpb", "WikiText bits per byte", False),
    ("tokens_per_s_generate", "generation tokens/s", True),
]

TASKS = ["text", "hellaswag", "lambada", "wikitext", "generate"]

DEFAULT_PROMPTS = [
    "Hello, I'm a language model,",
    "The meaning of life is",
    "The capital of France is",
    "Once upon a time, there was a",
    "In a shocking finding, scientists discovered a herd of unicorns",
]


@dataclass
class CompareData:
    """Everything every model is measured on, loaded once before the first model."""

    texts: list[str] = field(default_factory=list)  # held-out documents; empty: no held-out loss
    benchmarks: dict[str, list[dict]] = field(default_factory=dict)  # task -> records
    prompts: list[str] = field(default_factory=list)  # empty: no samples, no speed
    max_new_tokens: int = 40
    description: dict = field(default_factory=dict)  # what was used, for results.json and the report



def resolve_tasks(tasks: str, files: dict[str, str | None]) -> list[str]:
    """'auto': the tasks whose data was given as a file (plus generate), or all when none was given,
    so that naming local files alone never reaches for the Hub."""
    if tasks == "auto":
        given = [t for t in TASKS if files.get(t)]
        return [*given, "generate"] if given else list(TASKS)
    chosen = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = sorted(set(chosen) - set(TASKS))
    if unknown or not chosen:
        raise UserError(f"--tasks: unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}")
    return [t for t in TASKS if t in chosen]


def prepare_data(tasks: list[str], *, files: dict[str, str | None], limit: int | None, dataset_config: str = "",
                 dataset_split: str = "train", text_column: str = "text", val_fraction: float | None = None,
                 max_documents: int = 100, prompts: list[str] | None = None, max_new_tokens: int = 40) -> CompareData:
    """Load every task's data before the first model, so a missing dataset fails in seconds, not after an hour.

    Held-out text: `files["text"]` (a file, folder or Hub id), or FineWeb-Edu's first documents, which
    configs/gpt2-small.yaml holds out; `val_fraction` None means 0 (no hash hold-out).
    """
    data = CompareData(max_new_tokens=max_new_tokens)
    described: dict[str, dict] = {}
    if "text" in tasks:
        if files.get("text"):
            source = {"name": files["text"], "config": dataset_config, "split": dataset_split,
                      "holdout": val_fraction or 0.0}
        else:
            source = {**DEFAULT_TEXT, **({"holdout": val_fraction} if val_fraction is not None else {})}
        count = min(max_documents, limit) if limit else max_documents
        if not files.get("text") and not source["holdout"] and count > DEFAULT_TEXT["head"]:
            raise UserError(f"--max_documents {count}: the default text holds {DEFAULT_TEXT['head']:,} documents "
                            "that gpt2-small.yaml never trains on; ask for fewer")
        data.texts = text_documents(source["name"], config=source["config"], split=source["split"],
                                    column=text_column, holdout=source["holdout"], limit=count)
        where = ({"file": source["name"]} if Path(source["name"]).exists() else
                 {"source": source["name"], "config": source["config"] or None, "split": source["split"]})
        described["text"] = {**where, "holdout": source["holdout"], "documents": len(data.texts),
                             "bytes": sum(len(t.encode("utf-8")) for t in data.texts)}
    for task in ("hellaswag", "lambada", "wikitext"):
        if task in tasks:
            data.benchmarks[task], described[task] = load_benchmark(task, files.get(task), limit)
    if "generate" in tasks:
        data.prompts = prompts or DEFAULT_PROMPTS
    data.description = {"tasks": described, "limit": limit,
                        **({"prompts": data.prompts, "max_new_tokens": max_new_tokens} if data.prompts else {})}
    return data


def evaluate_model(name: str, data: CompareData, *, device: str, dtype: torch.dtype, batch_size: int):
    """(metrics, info, continuations) of one model on all of `data`."""
    model, tokenizer = load_model(name, device=device, dtype=dtype)
    metrics: dict[str, float] = {}
    if data.texts:
        metrics.update(heldout_loss(model, tokenizer, data.texts, batch_size=batch_size, desc=f"{name}: held-out"))
    for task, docs in data.benchmarks.items():
        metrics.update(RUNNERS[task](model, tokenizer, docs, batch_size=batch_size, desc=f"{name}: {task}"))
    continuations: list[str] = []
    if data.prompts:
        continuations, metrics["tokens_per_s_generate"] = samples_and_speed(model, tokenizer, data.prompts,
                                                                           max_new_tokens=data.max_new_tokens)
    peft_config = getattr(model, "peft_config", None)
    info = {"kind": f"PEFT adapter on {peft_config['default'].base_model_name_or_path}" if peft_config
            else ("local folder" if Path(name).is_dir() else "Hub model"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "context": context_length(model, tokenizer), "vocabulary": len(tokenizer)}
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics, info, continuations


def samples_and_speed(model, tokenizer, prompts: list[str], *, max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy continuations of each prompt (deterministic, so models are compared on the same footing) and
    the generation speed in new tokens per second, one prompt at a time with the KV cache."""
    generate_ids(model, tokenizer, prompts[:1], max_new_tokens=4)  # warm-up: kernels and caches outside the timing
    texts, new_tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        start = time.perf_counter()
        [ids] = generate_ids(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)  # a list: the GPU is done
        seconds += time.perf_counter() - start
        new_tokens += len(ids)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, new_tokens / seconds


def versions() -> dict:
    import datasets
    import evaluate
    import peft
    import transformers

    return {"hf_gpt": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "evaluate": evaluate.__version__, "peft": peft.__version__}


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if key.endswith(("_acc", "_acc_norm")):
        return f"{value:.4f}"
    if key.endswith("_ppl") or key == "tokens_per_s_generate":
        return f"{value:,.2f}" if math.isfinite(value) else str(value)
    return f"{value:.4f}"


def _delta(key: str, value: float | None, first: float | None) -> str:
    """How far a model is from the first one: points for accuracies, percent for the rest."""
    if value is None or first is None:
        return ""
    if key.endswith(("_acc", "_acc_norm")):
        return f" ({100 * (value - first):+.1f} pts)"
    return f" ({100 * (value / first - 1):+.1f}%)" if first else ""


def metrics_table(results: dict[str, dict]) -> str:
    """Markdown table, one row per measured metric, one column per model; the best value in bold, and
    each model after the first with its difference from the first."""
    names = list(results)
    lines = ["| metric | | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|:-:|" + "---:|" * len(names)]
    for key, label, higher in METRICS:
        values = [results[n].get(key) for n in names]
        present = [v for v in values if v is not None]
        if not present:
            continue
        best = max(present) if higher else min(present)
        cells = [(f"**{_fmt(key, v)}**" if v == best and len(names) > 1 else _fmt(key, v))
                 + (_delta(key, v, values[0]) if i else "") for i, v in enumerate(values)]
        lines.append(f"| {label} | {'↑' if higher else '↓'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(results: dict[str, dict], path: Path) -> None:
    """One bar panel per metric: each has its own scale and direction, so they are not stacked on one axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt

    shown = [(k, label, higher) for k, label, higher in METRICS if any(k in r for r in results.values())]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label, higher) in zip(axes.flat, shown):
        for i, (name, metrics) in enumerate(results.items()):
            if key in metrics:
                bar = ax.bar(i, metrics[key], color=colors[i % len(colors)], label=name)
                ax.bar_label(bar, labels=[_fmt(key, metrics[key])], fontsize=8)
        ax.set_title(f"{label} {'↑' if higher else '↓'}", fontsize=10)
        ax.set_xticks([])
        ax.margins(y=0.15)  # room for the value labels
        ax.set_ylim(bottom=0)  # every figure here is >= 0; bars from 0 show the ratio between models
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i % len(colors)]) for i in range(len(results))]
    fig.legend(handles, list(results), loc="upper center", ncol=min(len(results), 3), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _describe_data(data: dict) -> list[str]:
    lines = []
    titles = {"text": "held-out text", **{task: spec.title for task, spec in BENCHMARKS.items()}}
    for task, d in data.get("tasks", {}).items():
        where = d.get("file") or " ".join(str(d[k]) for k in ("source", "config", "split") if d.get(k))
        count = f"{d['documents']} documents, {d['bytes']:,} bytes" if task == "text" else f"{d['items']} items"
        holdout = f", documents held out by hash at {d['holdout']}" if d.get("holdout") else ""
        lines.append(f"- **{titles[task]}**: {where}{holdout}: {count}")
    if data.get("prompts"):
        lines.append(f"- **samples**: {len(data['prompts'])} prompts, greedy, up to {data['max_new_tokens']} new "
                     "tokens each, one prompt at a time (tokens/s)")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "↵ ").strip() or "(nothing)"


def write_report(out: Path, report: dict, chart_name: str) -> None:
    results, data = report["models"], report["data"]
    lines = ["# Model comparison", "",
             f"{report['run']['date']} · {report['run']['device']} · {report['run']['dtype']} · "
             f"`{report['run']['command']}`", ""]
    if data.get("limit"):
        lines += [f"> Quick run: at most {data['limit']} items per task. Not comparable with published figures.", ""]
    lines += ["## Results", "", metrics_table(results), "",
              "↑ higher is better, ↓ lower is better. Definitions, and the check against lm-evaluation-harness: "
              "docs/compare.md.", "", f"![metrics]({chart_name})", "", "## Models", "",
              "| model | kind | parameters | context | vocabulary |", "|---|---|---:|---:|---:|"]
    for name, info in report["model_info"].items():
        lines.append(f"| `{name}` | {info['kind']} | {info['parameters']:,} | {info['context']} "
                     f"| {info['vocabulary']:,} |")
    lines += ["", "## Data", "", *_describe_data(data), ""]
    if report["samples"]:
        lines += ["## Samples", ""]
        for sample in report["samples"]:
            lines += [f"**{_cell(sample['prompt'])}**", "", "| model | continuation |", "|---|---|"]
            lines += [f"| `{name}` | {_cell(text)} |" for name, text in sample["continuations"].items()]
            lines.append("")
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def check_output_dir(out: Path) -> None:
    """Before any scoring, which takes minutes to hours: a folder the results cannot be written to would lose
    them all at the end. Probed by writing in it, or in the nearest folder above that exists (nothing is left)."""
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"--output_dir {out}: {existing} is a file, not a folder; choose another --output_dir")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {out}: cannot write in {existing} ({e.strerror}); choose another "
                        "--output_dir") from None


def compare(models: list[str], data: CompareData, out: Path, *, device: str, dtype: torch.dtype,
            batch_size: int) -> dict:
    """Run every model, write report.md, comparison.png and results.json into `out`; returns the report."""
    check_output_dir(out)
    results, info, continuations = {}, {}, {}
    for name in models:
        results[name], info[name], continuations[name] = evaluate_model(name, data, device=device, dtype=dtype,
                                                                         batch_size=batch_size)
    report = {
        "models": results,
        "data": data.description,
        "versions": versions(),
        "model_info": info,
        "samples": [{"prompt": p, "continuations": {n: continuations[n][i] for n in models}}
                    for i, p in enumerate(data.prompts)],
        "run": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": _device_name(device),
                "dtype": str(dtype).removeprefix("torch."), "command": " ".join(["python", *sys.argv])},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    write_chart(results, out / "comparison.png")
    write_report(out, report, "comparison.png")
    return report


def _device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()})"
