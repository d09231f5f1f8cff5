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
from hf_gpt.engine import start_run, train  # noqa: E402
from hf_gpt.loading import context_length, load_model  # noqa: E402
from hf_gpt.sft import (SFTConfig, SFTData, add_base_replies, add_to_summary, answer_test_split,  # noqa: E402
                        check_config, resolve_chat_template, with_chat_template)


def main():
    cfg = load_config(SFTConfig, description=__doc__)
    check_config(cfg)
    template = resolve_chat_template(cfg.chat_template)
    accelerator = start_run(cfg)
    model, tokenizer = load_model(cfg.model, attn_implementation=cfg.attn_implementation, resid_pdrop=cfg.dropout,
                                  embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    tokenizer = with_chat_template(tokenizer, template)
    # final/ carries these, so that `pipeline("text-generation")` writes a whole reply and pads without a warning.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.max_new_tokens = cfg.max_new_tokens
    data = SFTData(cfg, tokenizer, context_length(model))
    accelerator.print(data.summary())
    result = train(cfg, model, tokenizer, data, accelerator,
                   info={"recipe": "sft", "base_model": cfg.model, "datasets": [cfg.dataset], "data": data.counts})
    if result.stopped_early or not accelerator.is_main_process:
        return
    wrote = "final/ (Hub format, with the chat template), metrics.jsonl, loss.png, summary.json, config.yaml"
    if data.test:
        model, tokenizer = load_model(str(result.final_dir), device=accelerator.device)
        replies = result.output_dir / "test_responses.jsonl"
        scores = answer_test_split(model, tokenizer, data.test, cfg, replies)
        if cfg.base_replies:
            base, _ = load_model(cfg.model, device=accelerator.device)
            add_base_replies(base, tokenizer, data.test[:cfg.base_replies], cfg, replies)
        add_to_summary(result.output_dir, "test", scores)
        line = f"test: {scores['test_records']} replies, ROUGE-L {scores['rougeL']:.4f}"
        if "judge_score" in scores:
            line += f", judge ({cfg.judge_model}) {scores['judge_score']} / 100"
        print(line)
        wrote += ", test_responses.jsonl"
    print(f"wrote {result.output_dir}/: {wrote}")


if __name__ == "__main__":
    run_cli(main)
