"""LoRA on a person's own writing: its settings, its data for the engine (whole documents, the held-out ones
apart), and its model (a PEFT adapter on the base, with an optional trigger token). hf_gpt.writing reads the
writing, hf_gpt.lora_report measures what the adaptation did, hf_gpt.recipes.run_lora puts them together.

The writing never leaves the machine as text: the console, metrics.jsonl, summary.json, report.* and
the adapter folder carry counts and numbers only. Generated text can quote the writing, so it goes to
`samples.private.md` alone, and `sample_prompts` (whose outputs the engine logs) stays empty by default.
The tokenized documents live in memory only (`Dataset.from_dict`, no cache files); the checkpoints
hold the unfinished block of the stream as token ids, as every run of the engine does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from datasets import Dataset
from datasets.distributed import split_dataset_by_node

from .config import SHUFFLE_ROWS_HELP, TrainConfig, UserError, first_line
from .data import PackedBatches, as_rows, positions_from_eos, process_share, token_batch
from .engine import accumulation_steps, run_length
from .files import atomic_folder
from .hub import mark_personal

GPT2_CONV1D = ["c_attn", "c_proj", "c_fc"]
# Steps that --epochs may set by itself; a longer run needs --max_steps or --max_tokens, given on purpose.
MAX_EPOCH_STEPS = 10_000


@dataclass
class LoraRunConfig(TrainConfig):
    """LoRA on a folder of your own writing. Defaults suit a few thousand to a few hundred thousand tokens."""

    output_dir: str = "runs/lora"
    model: str = field(default="", metadata={"help": "Base model: a folder such as runs/sft/final, or a Hub id."})
    dataset: str = field(default="", metadata={"help": "Your writing: a folder (read recursively: .txt, .md) or one file."})
    split_paragraphs: bool = field(
        default=False, metadata={"help": "Every paragraph (blank-line separated) is a document: for one long text."})
    val_fraction: float = field(
        default=0.2, metadata={"help": "Share of whole documents held out (by hash) to measure the adaptation on."})
    block_size: int = 256
    shuffle_rows: int = field(default=2048, metadata={"help": SHUFFLE_ROWS_HELP})
    epochs: float = 3.0
    r: int = field(default=8, metadata={"help": "LoRA rank; 0: no LoRA, train the trigger token's embedding alone."})
    lora_alpha: int = field(default=16, metadata={"help": "The LoRA update is scaled by lora_alpha / r."})
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(GPT2_CONV1D),
                                      metadata={"help": "Modules LoRA adapts: GPT-2's Conv1D layers by default."})
    trigger_token: str = field(default="", metadata={
        "help": "A new token (e.g. <|me|>) put before every training document, so that it switches the style on."})
    general_text: str = field(default="", metadata={
        "help": "Folder or file to measure behaviour without the trigger on; empty: text the base model writes itself."})
    report_prompts: list[str] = field(default_factory=lambda: ["Dear diary,", "Today I", "I think that"],
                                      metadata={"help": "Prompts both models continue in samples.private.md."})
    merge: bool = field(default=False, metadata={"help": "Also write <output_dir>/merged: the adapter merged into a plain model."})
    # Little text, a small update: a higher rate than pretraining's end, no decay pulling LoRA towards 0.
    micro_batch_size: int = 4
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    log_every: int = 5
    eval_batches: int = 0

    renamed: ClassVar[dict[str, str]] = {**TrainConfig.renamed, "writing": "dataset", "holdout_fraction": "val_fraction",
                                         "alpha": "lora_alpha"}


# ---------------------------------------------------------------------------------------------------
# Batches for the engine


def as_documents(token_lists: list[list[int]], eos: int, trigger_id: int | None = None) -> list[list[int]]:
    """[EOS] (+ trigger) + tokens: the engine's document layout, with the trigger where the style begins."""
    head = [eos] if trigger_id is None else [eos, trigger_id]
    return [head + ids for ids in token_lists]


def pack_documents(documents: list[list[int]], *, block_size: int, micro_batch_size: int, eos: int,
                   no_loss: int | None = None) -> list[dict]:
    """Every token of `documents` exactly once, in rows of block_size cut as in training (a document cut
    by a row goes on at position 0 in the next); the last row is padded with tokens that carry no loss."""
    batch = token_batch(as_rows(np.concatenate([np.asarray(d, dtype=np.int64) for d in documents]), block_size), no_loss)
    batch["position_ids"] = positions_from_eos(batch["input_ids"], eos)  # every document starts with EOS
    return [dict(zip(batch, rows)) for rows in zip(*(t.split(micro_batch_size) for t in batch.values()))]


class WritingData:
    """The engine's data: the training documents packed and reshuffled every epoch, the held-out ones whole."""

    def __init__(self, cfg: LoraRunConfig, train_ids: list[list[int]], heldout_ids: list[list[int]], eos: int,
                 trigger_id: int | None):
        self.cfg, self.eos, self.trigger_id = cfg, eos, trigger_id
        self.train_documents = as_documents(train_ids, eos, trigger_id)
        self.heldout_ids = heldout_ids

    def train_batches(self, process_index: int, num_processes: int):
        if len(self.train_documents) < num_processes:
            raise UserError(f"{len(self.train_documents)} training documents cannot be shared among "
                            f"{num_processes} processes; use fewer processes")
        # One shard per document: shuffling the shards reorders the documents every epoch (set_epoch),
        # and a buffer of 1 keeps the stream's state_dict exact for resuming.
        docs = Dataset.from_dict({"input_ids": self.train_documents}).to_iterable_dataset(
            num_shards=len(self.train_documents)).shuffle(seed=self.cfg.seed, buffer_size=1)
        if num_processes > 1:
            docs = split_dataset_by_node(docs, rank=process_index, world_size=num_processes)
        # The trigger is given, never a target: were it one, the model would learn to write it after every
        # EOS and so switch the style on by itself.
        return PackedBatches(docs, block_size=self.cfg.block_size, micro_batch_size=self.cfg.micro_batch_size,
                             shuffle_rows=self.cfg.shuffle_rows, seed=self.cfg.seed + process_index,
                             no_loss=self.trigger_id)

    def steps_per_epoch(self, num_processes: int, accumulation: int) -> float:
        """Optimizer steps of one pass over the training documents, for --epochs."""
        tokens_per_step = self.cfg.micro_batch_size * self.cfg.block_size * accumulation * num_processes
        return sum(map(len, self.train_documents)) / tokens_per_step

    def heldout(self, with_trigger: bool) -> list[dict]:
        return heldout_batches(self.cfg, self.heldout_ids, self.eos, self.trigger_id if with_trigger else None)

    def eval_batches(self, process_index: int, num_processes: int) -> list[dict]:
        """The held-out writing as the adapter is meant to be used: after the trigger, when there is one."""
        return process_share(self.heldout(self.trigger_id is not None), process_index, num_processes,
                             self.cfg.eval_batches)


def heldout_batches(cfg: LoraRunConfig, heldout_ids: list[list[int]], eos: int, trigger_id: int | None) -> list[dict]:
    """All held-out documents, the trigger first when given."""
    return pack_documents(as_documents(heldout_ids, eos, trigger_id), block_size=cfg.block_size,
                          micro_batch_size=cfg.micro_batch_size, eos=eos, no_loss=trigger_id)


# ---------------------------------------------------------------------------------------------------
# Model: base, trigger token, PEFT wrapping


def base_model_name(model: str) -> str:
    """A local base as an absolute path, a Hub id as it is: PEFT records the name the base was loaded by
    in adapter_config.json, and AutoPeftModelForCausalLM must find it from any working directory."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def add_trigger_token(tokenizer, model, token: str) -> int:
    from transformers import AddedToken

    if token in tokenizer.get_vocab():
        raise UserError(f"trigger_token {token!r} is already in the tokenizer; choose a new string such as <|me|>")
    # Special: matched whole wherever it is typed, never split by BPE, dropped by skip_special_tokens.
    tokenizer.add_tokens([AddedToken(token, special=True)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= model.get_input_embeddings().num_embeddings:
        # No spare (padding) row: grow by one, as AutoPeftModelForCausalLM grows the base when loading the adapter.
        model.resize_token_embeddings(len(tokenizer))
    return token_id


def wrap_model(cfg: LoraRunConfig, model, trigger_id: int | None):
    """LoRA on the target modules; the trigger's embedding row (and with it GPT-2's tied output row)
    trained through PEFT's trainable tokens, which store that one row, not the whole embedding."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    tokens = None if trigger_id is None else [trigger_id]
    if cfg.r == 0:
        config = TrainableTokensConfig(token_indices=tokens, task_type="CAUSAL_LM")
    else:
        config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=list(cfg.target_modules),
                            fan_in_fan_out=True,  # GPT-2's Conv1D keeps its weight as (in, out)
                            trainable_token_indices=tokens, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module the model does not have
        raise UserError(f"PEFT could not wrap {cfg.model}: {first_line(e)}") from None


def save_merged(peft_model, tokenizer, folder: Path) -> None:
    """The adapter folded into the weights: a plain model, written aside and swapped in like final/."""
    merged = peft_model.merge_and_unload()
    with atomic_folder(folder) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        mark_personal(tmp)  # a plain model does not say it learnt someone's writing: the folder must


# ---------------------------------------------------------------------------------------------------
# Before the run


def check_config(cfg: LoraRunConfig) -> None:
    if not cfg.model:
        raise UserError("set --model: the base model folder (e.g. runs/sft/final) or a Hub id")
    if not cfg.dataset:
        raise UserError("set --dataset: a folder of your .txt/.md writing, or one file")
    if cfg.r == 0 and not cfg.trigger_token:
        raise UserError("r 0 trains the trigger token alone: set --trigger_token too")
    if cfg.optimizer != "adamw":
        raise UserError(f"LoRA trains with AdamW: optimizer {cfg.optimizer} is for a whole model's hidden matrices, "
                        "not low-rank adapters; drop --optimizer")


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids, one document at a time: the tokenizer's full output (offsets, token strings) for all of
    them at once takes ~40 times the text's size in memory, the ids alone ~10."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def plan_steps(cfg: LoraRunConfig, counts: dict, num_processes: int) -> str:
    """The one line that says what the run will cost, before it starts; more than MAX_EPOCH_STEPS steps from
    --epochs is refused."""
    per_micro = cfg.micro_batch_size * cfg.block_size
    per_step = per_micro * accumulation_steps(cfg, per_micro, num_processes) * num_processes
    # A pass over the training documents: each one after its EOS (and the trigger), as WritingData lays them out.
    epoch = counts["train_tokens"] + counts["train_documents"] * (2 if cfg.trigger_token else 1)
    steps = run_length(cfg, per_step, epoch / per_step)  # as the engine will count them
    if cfg.max_steps or cfg.max_tokens:
        length = f"--max_steps {cfg.max_steps}" if cfg.max_steps else f"--max_tokens {cfg.max_tokens:,}"
    else:
        if steps > MAX_EPOCH_STEPS:
            raise UserError(f"{cfg.epochs:g} epochs of {counts['train_tokens']:,} tokens take {steps:,} steps of "
                            f"{per_step:,} tokens, more than the {MAX_EPOCH_STEPS:,} --epochs may set: pass "
                            "--max_steps to train that long on purpose, or train on less writing")
        length = f"{cfg.epochs:g} epochs"
    return (f"cost: {counts['train_documents']} documents to train on ({counts['train_tokens']:,} tokens), "
            f"{counts['heldout_documents']} held out ({counts['heldout_tokens']:,} tokens); {length}: "
            f"{steps:,} steps of {per_step:,} tokens ({steps * per_step:,} tokens, {steps * per_step / epoch:.1f} "
            "passes over the training documents)")
