"""Put any models side by side on the same data: held-out loss/perplexity/bits per byte, HellaSwag,
LAMBADA, WikiText (as lm-evaluation-harness scores them), greedy samples and generation speed.

    python scripts/compare.py runs/gpt2-small/final openai-community/gpt2 runs/me/adapter --output_dir reports/cmp
    python scripts/compare.py runs/a/final runs/b/final --dataset held_out.txt --output_dir reports/ab   # offline
    python scripts/compare.py runs/a/final openai-community/gpt2 --limit 200                             # quick look

A model is a Hub id, a Hub-format folder (runs/<name>/final) or a PEFT adapter folder (runs/<name>/adapter,
loaded on the base model its adapter_config.json names). Writes report.md, comparison.png and
results.json into --output_dir. docs/compare.md explains every figure.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402

from hf_gpt.benchmarks import DEFAULT_TEXT  # noqa: E402
from hf_gpt.compare import TASKS, compare, metrics_table, prepare_data, resolve_tasks  # noqa: E402
from hf_gpt.config import ScriptParser, UserError, run_cli  # noqa: E402

# Flags named otherwise before every script took the same vocabulary: refused with the new name.
RENAMED = {"out": "output_dir", "text": "dataset", "text-config": "dataset_config", "text-split": "dataset_split",
           "text-holdout": "val_fraction", "text-docs": "max_documents"}


def parse_args(argv=None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, renamed=RENAMED)
    p.add_argument("models", nargs="+", help="Hub ids, model folders or PEFT adapter folders.")
    p.add_argument("--output_dir", default="reports/compare", help="Folder for report.md, comparison.png, results.json.")
    p.add_argument("--tasks", default="auto",
                   help=f"Comma-separated, from {','.join(TASKS)}. 'auto' (default): the tasks whose data you "
                        "passed as files, plus generate; all of them (data from the Hub) when you passed none.")
    p.add_argument("--limit", type=int, help="At most N items (documents) per task, for a quick run; left out: all.")
    d = p.add_argument_group("data: a local file instead of the Hub dataset lm-eval uses",
                             "The --hellaswag, --lambada and --wikitext files may be compressed (.gz, .xz, .bz2).")
    d.add_argument("--dataset", help=f"Held-out text: a file (.txt is one document; .jsonl/.parquet: --text_column), "
                                     f"a folder, or a Hub dataset id. Default: {DEFAULT_TEXT['name']} "
                                     f"({DEFAULT_TEXT['config']}), the documents the gpt2-small recipe holds out.")
    d.add_argument("--dataset_config", default="", help="Hub dataset config of --dataset.")
    d.add_argument("--dataset_split", default="train", help="Split of --dataset on the Hub.")
    d.add_argument("--text_column", default="text")
    d.add_argument("--val_fraction", type=float,
                   help="Only documents held out by hash at this fraction (the model's training val_fraction). "
                        "Default: 0 (all; the default text: its first documents, which gpt2-small.yaml holds out).")
    d.add_argument("--max_documents", type=int, default=100, help="Number of held-out documents.")
    d.add_argument("--hellaswag", help="JSON Lines with Rowan/hellaswag's fields (activity_label, ctx_a, ctx_b, "
                                       "endings, label), or with ctx in place of ctx_a and ctx_b.")
    d.add_argument("--lambada", help="JSON Lines with EleutherAI/lambada_openai's field 'text'.")
    d.add_argument("--wikitext", help="JSON Lines with EleutherAI/wikitext_document_level's field 'page'; "
                                      "a WikiText .raw file (wiki.test.raw), split into articles as that "
                                      "dataset splits it; or a .txt file (one page).")
    g = p.add_argument_group("samples")
    g.add_argument("--prompts", help="Text file, one prompt per line (default: five fixed prompts).")
    g.add_argument("--max_new_tokens", type=int, default=40)
    r = p.add_argument_group("running")
    r.add_argument("--batch_size", type=int, default=16, help="Sequences per forward pass.")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="float32 (default) gives the figures lm-eval gives; half precision is faster on a GPU.")
    return p.parse_args(argv)


def main():
    args = parse_args()
    if args.limit is not None and args.limit < 1:  # 0 would read as no limit at all: the long run, not the quick one
        raise UserError(f"--limit must be 1 or more (leave it out for every item), not {args.limit}")
    files = {"text": args.dataset, "hellaswag": args.hellaswag, "lambada": args.lambada, "wikitext": args.wikitext}
    tasks = resolve_tasks(args.tasks, files)
    prompts = None
    if args.prompts:
        if not Path(args.prompts).is_file():
            raise UserError(f"--prompts: file not found: {args.prompts}")
        prompts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"tasks: {', '.join(tasks)}")
    data = prepare_data(tasks, files=files, limit=args.limit, dataset_config=args.dataset_config,
                        dataset_split=args.dataset_split, text_column=args.text_column, val_fraction=args.val_fraction,
                        max_documents=args.max_documents, prompts=prompts, max_new_tokens=args.max_new_tokens)
    out = Path(args.output_dir)
    report = compare(args.models, data, out, device=args.device, dtype=getattr(torch, args.dtype),
                     batch_size=args.batch_size)
    print()
    print(metrics_table(report["models"]))
    print(f"\nwrote {out}/: report.md (table, data, samples side by side), comparison.png, results.json")


if __name__ == "__main__":
    run_cli(main)
