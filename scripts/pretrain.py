"""Pretrain a GPT-2 from a fresh config.

    accelerate launch scripts/pretrain.py                                    # offline quick run on a CPU
    accelerate launch scripts/pretrain.py --config configs/gpt2-small.yaml   # GPT-2 124M on FineWeb-Edu
    accelerate launch scripts/pretrain.py --config X.yaml --output_dir runs/try --resume
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from hf_gpt.config import PretrainConfig, load_config, run_cli  # noqa: E402
from hf_gpt.recipes import run_pretrain  # noqa: E402


def main():
    result = run_pretrain(load_config(PretrainConfig, description=__doc__))
    if result:
        print(f"wrote {result.output_dir}/: final/ (Hub format), metrics.jsonl, loss.png, summary.json, config.yaml, "
              "checkpoints/")


if __name__ == "__main__":
    run_cli(main)
