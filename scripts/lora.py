"""LoRA on your own writing: adapt a model to a person's style, and report what it changed.

    accelerate launch scripts/lora.py --model runs/sft/final --dataset ~/notes --output_dir runs/me
    accelerate launch scripts/lora.py --config configs/lora.yaml --model M --dataset DIR --trigger_token '<|me|>' --merge
    accelerate launch scripts/lora.py --model M --dataset story.txt --split_paragraphs   # one long text

Writes <output_dir>/adapter (PEFT: loads with AutoPeftModelForCausalLM), report.md / report.json
(held-out perplexity, base against adapted: numbers only), samples.private.md (generated text: keep
it local) and, with --merge, <output_dir>/merged (a plain transformers model).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from hf_gpt.config import load_config, run_cli  # noqa: E402
from hf_gpt.lora import LoraRunConfig  # noqa: E402
from hf_gpt.lora_report import SAMPLES_FILE  # noqa: E402
from hf_gpt.recipes import run_lora  # noqa: E402


def main():
    cfg = load_config(LoraRunConfig, description=__doc__)
    report = run_lora(cfg)
    if report is None:  # another process (a run stopped by a signal raised Stopped: run_cli exits 128 + its number)
        return
    h, g = report["heldout_perplexity"], report["general_perplexity"]
    line = f"held-out perplexity on your writing: base {h['base']:.2f} -> adapted {h['adapted']:.2f}"
    if "adapted_with_trigger" in h:
        line += f" ({cfg.trigger_token} first: {h['adapted_with_trigger']:.2f})"
    print(line)
    print(f"general text, no trigger ({g['text']}): base {g['base']:.2f} -> adapted {g['adapted']:.2f}")
    out = Path(cfg.output_dir)
    print(f"wrote {out}/: adapter/ (PEFT adapter + tokenizer){', merged/ (plain model)' if cfg.merge else ''}, "
          f"report.md, report.json, {SAMPLES_FILE} (generated text: keep it local), metrics.jsonl, "
          f"summary.json, config.yaml, checkpoints/")


if __name__ == "__main__":
    run_cli(main)
