"""Pretrain a GPT-2 from a fresh config.

    accelerate launch scripts/pretrain.py                                    # offline quick run on a CPU
    accelerate launch scripts/pretrain.py --config configs/gpt2-small.yaml   # GPT-2 124M on FineWeb-Edu
    accelerate launch scripts/pretrain.py --config X.yaml --output_dir runs/try --resume
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from hf_gpt.config import PretrainConfig, load_config, run_cli  # noqa: E402
from hf_gpt.data import PretrainData  # noqa: E402
from hf_gpt.engine import start_run, train  # noqa: E402
from hf_gpt.model import build_model  # noqa: E402
from hf_gpt.tokenizer import run_tokenizer  # noqa: E402


def check_hub_login(repo_id: str) -> None:
    """--push_to_hub: the repo id, the token and the Hub's answer are checked before training, not after it."""
    from hf_gpt.hub import check_names, hub_login

    check_names(repo_id)
    hub_login(repo_id, missing="--push_to_hub needs a Hugging Face token")


def main():
    cfg = load_config(PretrainConfig, description=__doc__)
    if cfg.push_to_hub:
        check_hub_login(cfg.push_to_hub)
    accelerator = start_run(cfg)
    data = PretrainData(cfg, tokenizer=None)
    data.tokenizer = run_tokenizer(cfg, accelerator, data)
    model = build_model(cfg, len(data.tokenizer), data.tokenizer.eos_token_id)
    accelerator.print(f"model: {model.num_parameters():,} parameters")
    result = train(cfg, model, data.tokenizer, data, accelerator,
                   info={"recipe": "pretrain", "base_model": None, "datasets": [cfg.dataset]})
    if result.stopped_early:
        return
    if cfg.push_to_hub and accelerator.is_main_process:
        from hf_gpt.hub import push_folder

        accelerator.print(f"pushed to {push_folder(result.final_dir, cfg.push_to_hub)}")
    accelerator.print(f"wrote {result.output_dir}/: final/ (Hub format), metrics.jsonl, loss.png, "
                      f"summary.json, config.yaml, checkpoints/")


if __name__ == "__main__":
    run_cli(main)
