"""Instruction-tune a GPT-2 (this project's or OpenAI's) on Alpaca-style records; loss on the replies only.

    accelerate launch scripts/sft.py --config configs/sft.yaml --model runs/gpt2-small/final
    accelerate launch scripts/sft.py --config configs/sft.yaml --model openai-community/gpt2 --dataset my.jsonl
    python scripts/generate.py runs/sft/final --chat        # talk to it

After training, the test split's replies go to <output_dir>/test_responses.jsonl with ROUGE-L, and with
an LLM judge's 0-100 score when --judge_url and --judge_model name an OpenAI-compatible server; the first
--base_replies test prompts also get the base model's reply (base_response), before beside after.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from hf_gpt.config import load_config, run_cli  # noqa: E402
from hf_gpt.recipes import run_sft  # noqa: E402
from hf_gpt.sft import SFTConfig  # noqa: E402


def main():
    cfg = load_config(SFTConfig, description=__doc__)
    done = run_sft(cfg)
    if done is None:
        return
    result, scores = done
    wrote = "final/ (Hub format, with the chat template), metrics.jsonl, loss.png, summary.json, config.yaml"
    if scores:
        line = f"test: {scores['test_records']} replies, ROUGE-L {scores['rougeL']:.4f}"
        if "judge_score" in scores:
            line += f", judge ({cfg.judge_model}) {scores['judge_score']} / 100"
        print(line)
        wrote += ", test_responses.jsonl"
    print(f"wrote {result.output_dir}/: {wrote}")


if __name__ == "__main__":
    run_cli(main)
