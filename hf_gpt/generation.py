"""Generating text: the one place that calls `model.generate`, for the training loop's samples, SFT's test
replies, LoRA's report, scripts/generate.py and scripts/compare.py.

A chat prompt is always built by `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`,
the same call `pipeline("text-generation")` makes, so a model is given exactly the prompt it was
trained on (hf_gpt.sft checks that for every training record).
"""

from __future__ import annotations

import torch

from .config import UserError
from .loading import context_length

# The samples a run logs at every evaluation, and LoRA's report: greedy decoding of a small model loops on one
# line, so they are sampled, from a fixed seed so that they are comparable between evaluations.
SAMPLED = {"do_sample": True, "temperature": 0.8, "top_k": 40}


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation so far plus the header that opens the assistant's reply."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[str] | list[list[int]], *, max_new_tokens: int, batch_size: int = 1,
                 seed: int | None = None, **sampling) -> list[list[int]]:
    """The token ids each prompt (a text, or token ids) is continued with, up to and with the end-of-text token.

    Greedy unless `sampling` says otherwise (do_sample, temperature, top_k, top_p: `model.generate`'s own).
    With a `seed`, sampling draws from a forked RNG seeded with it, so the caller's stream is left exactly
    where it was (a training run resumed later stays identical). Prompts go in batches padded on the left,
    so every row ends where its reply begins; `generate` derives the positions from the attention mask, so
    padding changes nothing.
    """
    if max_new_tokens < 1:  # else the room left below would blame the prompt's length
        raise UserError(f"max_new_tokens must be 1 or more, not {max_new_tokens}")
    ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    limit, eos = context_length(model, tokenizer), tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    replies = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size]
            width = max(map(len, batch))
            room = min(max_new_tokens, limit - width)  # position embeddings end at the context length
            if room < 1:
                raise UserError(f"a prompt of {width} tokens leaves no room for a reply in the model's "
                                f"context of {limit} tokens")
            # Padded here rather than by tokenizer.pad, which refuses a tokenizer without a pad token
            # (a pretraining run's has none); the padding is masked out, so any id serves.
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, prompt in enumerate(batch):
                input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
                attention_mask[row, width - len(prompt):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=room, pad_token_id=pad, eos_token_id=eos,
                                 **{"do_sample": False, **sampling})
            for row in out[:, width:].tolist():
                replies.append(row[:row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    return replies


def generate(model, tokenizer, prompts: list[str] | list[list[int]], *, max_new_tokens: int, batch_size: int = 1,
             seed: int | None = None, **sampling) -> list[str]:
    """The text each prompt is continued with (generate_ids, decoded without special tokens)."""
    return tokenizer.batch_decode(generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, seed=seed, **sampling),
                                  skip_special_tokens=True)
