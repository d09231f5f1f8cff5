"""The three recipes, each the same moves in the same order: check what can be checked cheaply, start_run(),
a tokenizer and a model, the recipe's data object, train(), then what the recipe does with the result.
The scripts parse a config, call one of these, and print where things went.

Each returns what the script reports, on the main process, and None on the others; a run stopped by a
signal raises Stopped on every process (the engine said where to resume), which run_cli turns into exit
status 128 + the signal's number.
"""

from __future__ import annotations

from accelerate import PartialState

from .config import PretrainConfig, Stopped, UserError, dataset_names
from .data import PretrainData
from .engine import RunResult, train
from .hub import check_names, hub_login, mark_personal, push_folder
from .loading import context_length, load_causal_lm, load_model, load_tokenizer
from .lora import (LoraRunConfig, WritingData, add_trigger_token, base_model_name, check_config as check_lora,
                   plan_steps, save_merged, tokenize, wrap_model)
from .lora_report import LoraReport
from .model import build_model, check_shape
from .scoring import add_base_replies, add_to_summary, answer_test_split, check_rouge
from .sft import SFTConfig, SFTData, check_config as check_sft, resolve_chat_template, with_chat_template
from .start import start_run
from .tokenizer import run_tokenizer
from .writing import read_writing, split_documents


def run_pretrain(cfg: PretrainConfig) -> RunResult | None:
    """A fresh GPT-2 trained on cfg.dataset; final/ pushed to the Hub with --push_to_hub."""
    if cfg.push_to_hub:  # the repo id, the token and the Hub's answer before training, not after it
        check_names(cfg.push_to_hub)
        hub_login(cfg.push_to_hub, missing="--push_to_hub needs a Hugging Face token")
    # The model's shape and size before the tokenizer (a minute to train) is: with the size it will have, if known.
    check_shape(cfg, cfg.tokenizer_vocab_size if cfg.tokenizer == "train" else 0)
    accelerator = start_run(cfg)
    data = PretrainData(cfg, tokenizer=None)
    data.tokenizer = run_tokenizer(cfg, accelerator, data)
    model = build_model(cfg, len(data.tokenizer), data.tokenizer.eos_token_id)
    accelerator.print(f"model: {model.num_parameters():,} parameters")
    result = train(cfg, model, data.tokenizer, data, accelerator,
                   info={"recipe": "pretrain", "base_model": None, "datasets": dataset_names(cfg.dataset)})
    if result.stopped_early:
        raise Stopped(result.stop_signal)
    if not accelerator.is_main_process:
        return None
    if cfg.push_to_hub:
        print(f"pushed to {push_folder(result.final_dir, cfg.push_to_hub)}")
    return result


def run_sft(cfg: SFTConfig) -> tuple[RunResult, dict] | None:
    """cfg.model tuned on cfg.dataset's records; then the test split answered and scored (the scores, {} when
    the split is empty), and the first base_replies prompts answered by the base model too."""
    check_sft(cfg)
    if cfg.test_fraction > 0:  # the test replies are scored after training: a missing package must stop it before
        check_rouge()
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
    if result.stopped_early:
        raise Stopped(result.stop_signal)
    if not accelerator.is_main_process:
        return None
    if not data.test:
        return result, {}
    model, tokenizer = load_model(str(result.final_dir), device=accelerator.device)
    replies = result.output_dir / "test_responses.jsonl"
    scores = answer_test_split(model, tokenizer, data.test, data.test_prompts, cfg, replies)
    if cfg.base_replies:
        base = load_causal_lm(cfg.model, device=accelerator.device)
        add_base_replies(base, tokenizer, data.test_prompts[:cfg.base_replies], cfg, replies)
    add_to_summary(result.output_dir, "test", scores)
    return result, scores


def run_lora(cfg: LoraRunConfig) -> dict | None:
    """A LoRA adapter (adapter/) on cfg.model trained on the writing in cfg.dataset, and the report of what it
    changed (lora_report); with --merge, merged/ too."""
    check_lora(cfg)
    # What can refuse the run comes before it creates anything: the writing, the tokenizer, the run's length.
    writing = read_writing(cfg.dataset, cfg.split_paragraphs)
    train_texts, heldout_texts = split_documents(writing.documents, cfg.val_fraction)
    tokenizer = load_tokenizer(cfg.model)
    # Tokenized before the trigger exists: the writing's own characters never become the trigger.
    train_ids, heldout_ids = tokenize(tokenizer, train_texts), tokenize(tokenizer, heldout_texts)
    counts = {"files_read": writing.files, "documents": len(writing.documents), "skipped": dict(writing.skipped),
              "split_paragraphs": cfg.split_paragraphs,
              "train_documents": len(train_ids), "train_tokens": sum(map(len, train_ids)),
              "heldout_documents": len(heldout_ids), "heldout_tokens": sum(map(len, heldout_ids))}
    state = PartialState()  # the processes, before start_run's Accelerator (which shares this state)
    state.print(f"writing: {writing.describe()}")
    state.print(plan_steps(cfg, counts, state.num_processes))
    accelerator = start_run(cfg)
    base = base_model_name(cfg.model)
    # On the device at once: the base is measured there before training (LoraReport.measure_base).
    model = load_causal_lm(base, device=accelerator.device, attn_implementation=cfg.attn_implementation)
    if cfg.block_size > context_length(model):
        raise UserError(f"block_size {cfg.block_size} is longer than the model's context ({context_length(model)})")
    report = LoraReport(cfg, accelerator, tokenizer, heldout_ids)
    if accelerator.is_main_process:  # the base as given, before the trigger row or any adapter touches it
        report.measure_base(model)

    trigger_id = add_trigger_token(tokenizer, model, cfg.trigger_token) if cfg.trigger_token else None
    model = wrap_model(cfg, model, trigger_id)
    data = WritingData(cfg, train_ids, heldout_ids, tokenizer.eos_token_id, trigger_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"adapter: {trainable:,} trainable parameters")
    result = train(cfg, model, tokenizer, data, accelerator, final_name="adapter",
                   info={"recipe": "lora", "base_model": base, "datasets": [], "writing": counts},
                   # inside the folder's swap: copied anywhere, adapter/ still says what it learnt
                   mark_final=mark_personal)
    if result.stopped_early:
        raise Stopped(result.stop_signal)
    if not accelerator.is_main_process:
        return None
    summary = report.write(model, data, result, base_model=base, counts=counts, trainable=trainable)
    if cfg.merge:
        save_merged(model, tokenizer, result.output_dir / "merged")
    return summary
