"""Generation: load a model (a folder, a Hub id or a PEFT adapter) and write replies to prompts.

A chat prompt is always built by `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`,
the same call `pipeline("text-generation")` makes, so a model is given exactly the prompt it was
trained on (hf_gpt.sft checks that for every training record).
"""

from __future__ import annotations

import torch

from .config import UserError
from .evaluation import load_model


def load_for_generation(name: str, device: str | torch.device | None = None):
    """(model, tokenizer) in eval mode on `device` (a GPU when there is one), ready to pad batches.

    A folder with adapter_config.json is a PEFT adapter, loaded on the base model its config names.
    """
    model, tokenizer = load_model(name, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is masked out, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_length(config) -> int:
    """Positions the model has embeddings for: GPT-2 calls it n_positions, most others max_position_embeddings."""
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation so far plus the header that opens the assistant's reply."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 1,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0) -> list[str]:
    """The text each prompt (token ids) is continued with, up to the end-of-text token.

    Prompts go in batches padded on the left, so every row ends where its reply begins; `generate`
    derives the positions from the attention mask, so padding changes nothing.
    """
    limit = context_length(model.config)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if do_sample else {"do_sample": False}
    replies = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer.pad({"input_ids": prompts[start:start + batch_size]}, padding_side="left",
                              return_tensors="pt").to(model.device)
        width = batch["input_ids"].shape[1]
        room = min(max_new_tokens, limit - width)  # position embeddings end at the context length
        if room < 1:
            raise UserError(f"a prompt of {width} tokens leaves no room for a reply in the model's "
                            f"context of {limit} tokens")
        out = model.generate(**batch, max_new_tokens=room, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies
