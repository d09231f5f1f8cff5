"""LoRA on a person's own writing: a folder of notes -> whole documents -> a PEFT adapter, trained by the
one engine loop, and a report of what the adaptation did (held-out perplexity, base against adapted).

The writing never leaves the machine as text: the console, metrics.jsonl, summary.json, report.* and
the adapter folder carry counts and numbers only. Generated text can quote the writing, so it goes to
`samples.private.md` alone, and `sample_prompts` (whose outputs the engine logs) stays empty by default.
The tokenized documents live in memory only (`Dataset.from_dict`, no cache files); the checkpoints
hold the unfinished block of the stream as token ids, as every run of the engine does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from datasets.distributed import split_dataset_by_node

from .config import TrainConfig, UserError
from .data import PackedBatches, positions_from_eos, process_share
from .engine import accumulation_steps, evaluate, run_length, start_run, train
from .files import atomic_folder
from .generation import SAMPLED, generate, generate_ids
from .hub import mark_personal
from .loading import context_length, load_model, load_tokenizer
from .tokenizer import token_byte_lengths

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
GPT2_CONV1D = ["c_attn", "c_proj", "c_fc"]
# General text (behaviour without the trigger) is measured on this many blocks of it.
GENERAL_BLOCKS = 16
SAMPLES_FILE = "samples.private.md"
# Bounds on what a run reads, so that memory stays bounded and a mistake is refused, not trained on for days.
# All .txt/.md files together: this recipe is for one person's writing, not a corpus (64 MB is ~10M words).
MAX_WRITING_BYTES = 64_000_000
# One document (a file, or a paragraph with --split_paragraphs): tokenizing one string takes ~150 times its
# size in memory (a 50 MB line took 7 GB), and held-out documents are whole ones.
MAX_DOCUMENT_CHARS = 1_000_000
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
# Reading the writing


@dataclass
class Writing:
    documents: list[str]
    files: int = 0  # text files read
    skipped: Counter = field(default_factory=Counter)  # reason -> how many files (or hidden folders)

    def describe(self) -> str:
        text = f"{len(self.documents)} documents from {self.files} file{'s' if self.files != 1 else ''}"
        if self.skipped:
            text += " (skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) + ")"
        return text


def read_writing(path: str, split_paragraphs: bool = False) -> Writing:
    """Every .txt/.md file under `path` (or `path` itself) as a document, in path order, exact duplicates
    removed. Hidden files and folders, other kinds of file, binary, non-UTF-8 and empty files are
    skipped and counted by reason. More than MAX_WRITING_BYTES in all, or a document longer than
    MAX_DOCUMENT_CHARS, is refused."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"writing not found: {path}")
    writing, seen, room = Writing([]), set(), MAX_WRITING_BYTES
    for file in _files(root, writing.skipped):
        reason, text, size = _read_text(file, room)
        room -= size
        if reason:
            writing.skipped[reason] += 1
            continue
        writing.files += 1
        for doc in _paragraphs(text) if split_paragraphs else [text]:
            if len(doc) > MAX_DOCUMENT_CHARS:
                raise UserError(f"{file}: " + (
                    f"a paragraph of {len(doc):,} characters, longer than the {MAX_DOCUMENT_CHARS:,} a document "
                    "may have: break it up with blank lines" if split_paragraphs else
                    f"{len(doc):,} characters in one document (each file is one), longer than the "
                    f"{MAX_DOCUMENT_CHARS:,} a document may have: pass --split_paragraphs to make each paragraph one"))
            if doc in seen:
                writing.skipped["duplicate"] += 1
            else:
                seen.add(doc)
                writing.documents.append(doc)
    if not writing.documents:
        raise UserError(f"writing {path}: no text to learn from in it ({writing.describe()})")
    return writing


def _files(root: Path, skipped: Counter):
    if root.is_file():
        yield root
        return
    for folder, dirs, files in os.walk(root):
        # Hidden folders (.git, .obsidian, .trash) are left unopened and counted once each.
        hidden = sum(d.startswith(".") for d in dirs)
        if hidden:
            skipped["hidden"] += hidden
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            yield Path(folder) / name


def _read_text(file: Path, room: int) -> tuple[str, str, int]:
    """(reason to skip, "", bytes read) or ("", the text, bytes read); more than `room` bytes is refused."""
    if file.name.startswith("."):
        return "hidden", "", 0
    if file.suffix.lower() not in TEXT_SUFFIXES:
        return "not .txt/.md", "", 0
    try:
        with file.open("rb") as f:
            data = f.read(room + 1)  # never more than the limit, whatever the file's size (+1: to see it is over)
    except OSError:
        return "unreadable", "", 0
    if len(data) > room:
        raise UserError(f"writing: more than {MAX_WRITING_BYTES / 1e6:g} MB of .txt/.md files (reached at {file}); "
                        "this recipe is for one person's writing: train on a part of it")
    if b"\x00" in data:  # text never holds NUL bytes; images, archives and UTF-16 files do
        return "binary", "", len(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "not UTF-8", "", len(data)
    text = text.replace("\r\n", "\n").strip()
    return ("empty", "", len(data)) if not text else ("", text, len(data))


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def split_documents(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held out): whole documents, the held-out ones those whose content hashes lowest. The same
    writing gives the same split on every run and process, whatever the files are called or their order."""
    if not 0 < fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, not {fraction}")
    if len(documents) < 2:
        raise UserError(f"{len(documents)} document: at least 2 are needed, one to train on and one to measure on "
                        "(one long text: --split_paragraphs)")
    count = min(len(documents) - 1, max(1, round(fraction * len(documents))))
    held = set(sorted(documents, key=_digest)[:count])
    return [d for d in documents if d not in held], [d for d in documents if d in held]


# ---------------------------------------------------------------------------------------------------
# Batches for the engine


def as_documents(token_lists: list[list[int]], eos: int, trigger_id: int | None = None) -> list[list[int]]:
    """[EOS] (+ trigger) + tokens: the engine's document layout, with the trigger where the style begins."""
    head = [eos] if trigger_id is None else [eos, trigger_id]
    return [head + ids for ids in token_lists]


def pack_documents(documents: list[list[int]], *, block_size: int, micro_batch_size: int, eos: int,
                   no_loss: int | None = None) -> list[dict]:
    """Every token of `documents` exactly once, in rows of block_size cut as in training (a document cut
    by a row goes on at position 0 in the next); the last row is filled with EOS that carry no loss."""
    tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents])
    padded = np.concatenate([tokens, np.full(-len(tokens) % block_size, eos, dtype=np.int64)])
    input_ids = torch.from_numpy(padded).view(-1, block_size)
    labels = input_ids.clone()
    labels.view(-1)[len(tokens):] = -100
    if no_loss is not None:
        labels[input_ids == no_loss] = -100
    position_ids = positions_from_eos(input_ids, eos)  # every document starts with EOS
    return [{"input_ids": i, "labels": t, "position_ids": p}
            for i, t, p in zip(input_ids.split(micro_batch_size), labels.split(micro_batch_size),
                               position_ids.split(micro_batch_size))]


class _TriggerNotPredicted:
    """The trigger is given, never a target: were it one, the model would learn to write it after every
    EOS and so switch the style on by itself."""

    def __init__(self, batches: PackedBatches, trigger_id: int):
        self.batches, self.trigger_id = batches, trigger_id

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        batch["labels"][batch["input_ids"] == self.trigger_id] = -100
        return batch

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


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
        batches = PackedBatches(docs, block_size=self.cfg.block_size, micro_batch_size=self.cfg.micro_batch_size,
                                seed=self.cfg.seed + process_index)
        return batches if self.trigger_id is None else _TriggerNotPredicted(batches, self.trigger_id)

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
        raise UserError(f"PEFT could not wrap {cfg.model}: {str(e).splitlines()[0]}") from None


def save_merged(peft_model, tokenizer, folder: Path) -> None:
    """The adapter folded into the weights: a plain model, written aside and swapped in like final/."""
    merged = peft_model.merge_and_unload()
    with atomic_folder(folder) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        mark_personal(tmp)  # a plain model does not say it learnt someone's writing: the folder must


# ---------------------------------------------------------------------------------------------------
# Measuring base against adapted


class Meter:
    """Perplexity and samples of one model, measured the same way before and after training."""

    def __init__(self, cfg: LoraRunConfig, accelerator, tokenizer, vocab_size: int):
        self.cfg, self.accelerator, self.tokenizer = cfg, accelerator, tokenizer
        self.byte_lengths = token_byte_lengths(tokenizer, vocab_size)

    def perplexity(self, model, batches: list[dict]) -> float:
        model.to(self.accelerator.device)
        with self.accelerator.autocast():  # the precision training evaluated in, for both models
            result = evaluate(model, batches, self.byte_lengths, self.cfg.attn_implementation)
        return result["val_ppl"]

    def pack(self, documents: list[list[int]]) -> list[dict]:
        return pack_documents(documents, block_size=self.cfg.block_size, micro_batch_size=self.cfg.micro_batch_size,
                              eos=self.tokenizer.eos_token_id)

    def samples(self, model, prefix: str = "") -> list[str]:
        return generate(model.to(self.accelerator.device), self.tokenizer, [prefix + p for p in self.cfg.report_prompts],
                        max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed, **SAMPLED)

    def base_written_text(self, model) -> list[list[int]]:
        """GENERAL_BLOCKS texts the base model writes from an empty context (sampled from its full
        distribution): behaviour without the trigger, by definition. On them log(adapted / base
        perplexity) estimates KL(base || adapted) per token. The seeded side stream leaves the training that
        follows drawing the same numbers as without this."""
        eos = self.tokenizer.eos_token_id
        rows = generate_ids(model.to(self.accelerator.device), self.tokenizer, [[eos]] * GENERAL_BLOCKS,
                            max_new_tokens=self.cfg.block_size - 1, batch_size=GENERAL_BLOCKS, seed=self.cfg.seed,
                            do_sample=True, top_k=0, top_p=1.0)
        rows = [row[:-1] if row and row[-1] == eos else row for row in rows]
        return as_documents([row for row in rows if row], eos)

    def general_documents(self, model) -> tuple[list[list[int]], str]:
        eos = self.tokenizer.eos_token_id
        if not self.cfg.general_text:
            docs = self.base_written_text(model)
            return docs, f"{len(docs)} texts the base model wrote itself"
        docs, room = [], GENERAL_BLOCKS * self.cfg.block_size
        for text in read_writing(self.cfg.general_text).documents:
            if room <= 1:
                break
            docs.append([eos] + self.tokenizer(text, add_special_tokens=False).input_ids[:room - 1])
            room -= len(docs[-1])
        return docs, f"the first {sum(map(len, docs)):,} tokens of {self.cfg.general_text}"


# ---------------------------------------------------------------------------------------------------
# The run


def check_config(cfg: LoraRunConfig) -> None:
    if not cfg.model:
        raise UserError("set --model: the base model folder (e.g. runs/sft/final) or a Hub id")
    if not cfg.dataset:
        raise UserError("set --dataset: a folder of your .txt/.md writing, or one file")
    if cfg.r == 0 and not cfg.trigger_token:
        raise UserError("r 0 trains the trigger token alone: set --trigger_token too")


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


def run_lora(cfg: LoraRunConfig) -> dict | None:
    """Train the adapter; on the main process return the report (None elsewhere, or when stopped early)."""
    check_config(cfg)
    # What can refuse the run comes before it creates anything: the writing, the tokenizer, the run's length.
    writing = read_writing(cfg.dataset, cfg.split_paragraphs)
    train_texts, heldout_texts = split_documents(writing.documents, cfg.val_fraction)
    tokenizer = load_tokenizer(cfg.model)
    eos = tokenizer.eos_token_id
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
    main = accelerator.is_main_process
    base = base_model_name(cfg.model)
    model, _ = load_model(base, attn_implementation=cfg.attn_implementation)  # the tokenizer is loaded already
    if cfg.block_size > context_length(model):
        raise UserError(f"block_size {cfg.block_size} is longer than the model's context ({context_length(model)})")

    meter = Meter(cfg, accelerator, tokenizer, model.config.vocab_size)
    before = {}
    if main:  # the base as given, before the trigger row or any adapter touches it
        general, general_source = meter.general_documents(model)
        before = {"heldout": meter.perplexity(model, heldout_batches(cfg, heldout_ids, eos, None)),
                  "general": meter.perplexity(model, meter.pack(general)), "samples": meter.samples(model)}

    trigger_id = add_trigger_token(tokenizer, model, cfg.trigger_token) if cfg.trigger_token else None
    model = wrap_model(cfg, model, trigger_id)
    data = WritingData(cfg, train_ids, heldout_ids, eos, trigger_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"adapter: {trainable:,} trainable parameters")

    result = train(cfg, model, tokenizer, data, accelerator, final_name="adapter",
                   info={"recipe": "lora", "base_model": base, "datasets": [], "writing": counts})
    if result.stopped_early or not main:
        return None
    mark_personal(result.final_dir)  # the engine wrote adapter/; copied anywhere, it still says what it learnt

    heldout = {"base": before["heldout"],
               "adapted": meter.perplexity(model, data.heldout(False))}
    samples = {"base": before["samples"], "adapted": meter.samples(model)}
    if trigger_id is not None:
        heldout["adapted_with_trigger"] = meter.perplexity(model, data.heldout(True))
        samples["adapted_with_trigger"] = meter.samples(model, cfg.trigger_token)
    report = {
        "base_model": base,
        "writing": counts,
        "adapter": {"method": "lora" if cfg.r else "trigger token only", "r": cfg.r, "lora_alpha": cfg.lora_alpha,
                    "lora_dropout": cfg.lora_dropout, "target_modules": list(cfg.target_modules) if cfg.r else [],
                    "trigger_token": cfg.trigger_token, "trainable_parameters": trainable},
        "training": {"steps": result.steps, "tokens": result.tokens, "learning_rate": cfg.learning_rate},
        "heldout_perplexity": heldout,
        "general_perplexity": {"text": general_source, "written_by_base": not cfg.general_text,
                               "tokens": sum(map(len, general)), "base": before["general"],
                               "adapted": meter.perplexity(model, meter.pack(general))},
        "samples_file": SAMPLES_FILE,
    }
    out = Path(cfg.output_dir)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    (out / SAMPLES_FILE).write_text(samples_markdown(cfg, samples))
    if cfg.merge:
        save_merged(model, tokenizer, out / "merged")
    return report


def _change(base: float, adapted: float) -> str:
    return f"{100 * (adapted / base - 1):+.1f}%"


def report_markdown(report: dict) -> str:
    """Counts and numbers only: nothing in it quotes the writing, so it can be shared."""
    w, a, h, g = report["writing"], report["adapter"], report["heldout_perplexity"], report["general_perplexity"]
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(w["skipped"].items())) or "none"
    method = (f"LoRA r={a['r']}, alpha={a['lora_alpha']}, dropout {a['lora_dropout']} on {', '.join(a['target_modules'])}"
              if a["r"] else "no LoRA: the trigger token's embedding alone")
    trigger = f"`{a['trigger_token']}`" if a["trigger_token"] else "none"
    lines = [
        "# LoRA on your writing: report", "",
        f"- Base model: `{report['base_model']}`",
        f"- Adapter: `adapter/` ({method}; trigger token {trigger}; {a['trainable_parameters']:,} trained parameters)",
        f"- Writing: {w['documents']} documents from {w['files_read']} files (skipped: {skipped}); "
        f"{w['train_documents']} trained on ({w['train_tokens']:,} tokens), {w['heldout_documents']} held out whole "
        f"({w['heldout_tokens']:,} tokens)",
        f"- Training: {report['training']['steps']} steps, {report['training']['tokens']:,} tokens, "
        f"learning rate {report['training']['learning_rate']}", "",
        "## Perplexity on your held-out writing", "",
        "Documents the adapter never saw. Lower: the model finds your writing less surprising.", "",
        "| model | perplexity | change |", "|---|---:|---:|",
        f"| base | {h['base']:.2f} | |",
        f"| adapted | {h['adapted']:.2f} | {_change(h['base'], h['adapted'])} |",
    ]
    if "adapted_with_trigger" in h:
        lines.append(f"| adapted, after {trigger} | {h['adapted_with_trigger']:.2f} | "
                     f"{_change(h['base'], h['adapted_with_trigger'])} |")
    lines += [
        "", "## Without the trigger: general text", "",
        f"Measured on {g['text']} ({g['tokens']:,} tokens), never with the trigger.", "",
        "| model | perplexity | change |", "|---|---:|---:|",
        f"| base | {g['base']:.2f} | |",
        f"| adapted | {g['adapted']:.2f} | {_change(g['base'], g['adapted'])} |", "",
        f"ln(adapted / base) = {math.log(g['adapted'] / g['base']):+.4f} nats per token"
        + (": on text the base model wrote, an estimate of KL(base || adapted)." if g["written_by_base"] else "."), "",
        "What \"unchanged without the trigger\" can mean: LoRA changes the weights every input goes through, "
        "so with r > 0 behaviour moves with or without the trigger; the trigger only adds a switch on top, "
        "and the table above says how far the rest moved. With r = 0 only the trigger's embedding row is "
        "trained: on text without it every logit except the trigger's own is the base model's, bit for bit; "
        "what moves is the probability of the trigger token itself (GPT-2 ties its output row to its input row).",
        "", f"Samples from the base and the adapted model for the same prompts: `{report['samples_file']}` "
        "(kept out of this report: generated text can quote your writing).", "",
    ]
    return "\n".join(lines)


def samples_markdown(cfg: LoraRunConfig, samples: dict) -> str:
    lines = ["# PRIVATE: samples from models trained on your writing", "",
             "Generated text can repeat your writing word for word. Keep this file local; never commit or push it.",
             f"Sampled continuations (temperature 0.8, top-k 40, a fixed seed), {cfg.max_new_tokens} new tokens.", ""]
    for i, prompt in enumerate(cfg.report_prompts):
        lines += [f"## {prompt!r}", ""]
        for name, texts in samples.items():
            shown = (cfg.trigger_token + prompt) if name == "adapted_with_trigger" else prompt
            lines += [f"**{name.replace('_', ' ')}** ({shown!r}):", "", "> " + (shown + texts[i]).replace("\n", "\n> "), ""]
    return "\n".join(lines)
