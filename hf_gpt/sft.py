"""Instruction tuning (SFT): records -> chats -> token ids with loss on the replies only -> batches for
the engine. The replies to the test split and their scores are hf_gpt.scoring's.

Every record becomes a chat, a list of messages:

    Alpaca             {"instruction", "input" (optional), "output"}
                         -> [{"role": "user", "content": instruction, "input": input},
                             {"role": "assistant", "content": output}]
    prompt-completion  {"prompt", "completion"} -> [user: prompt, assistant: completion]
    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}

and the tokenizer's chat template (Jinja, Alpaca style by default) turns a chat into text. The template
is the only place the prompt format is written down: training tokenizes through it, and it is saved
with the tokenizer, so `apply_chat_template`, `pipeline("text-generation")` and scripts/generate.py
all build the prompt the model was trained on. Its `{% generation %}` block marks the tokens that
carry loss: each reply and the end-of-text token after it.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .config import TrainConfig, UserError, could_not_load
from .data import process_share
from .generation import chat_prompt_ids
from .loading import MODEL_FILES, check_source

# The Alpaca format of "Build a Large Language Model (From Scratch)", ch. 7, which the article used.
# A system message replaces the opening sentence; a user message's optional "input" is the task's context.
ALPACA_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' -%}
    {{- messages[0]['content'] -}}
    {%- set chat = messages[1:] -%}
{%- else -%}
    {{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' -}}
    {%- set chat = messages -%}
{%- endif -%}
{%- for message in chat -%}
    {%- if message['role'] == 'user' -%}
        {{- '\\n\\n### Instruction:\\n' + message['content'] -}}
        {%- if message.get('input') -%}
            {{- '\\n\\n### Input:\\n' + message['input'] -}}
        {%- endif -%}
    {%- elif message['role'] == 'assistant' -%}
        {{- '\\n\\n### Response:\\n' -}}
        {%- generation -%}
            {{- message['content'] + eos_token -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('the Alpaca template takes a system message first, then user and assistant messages') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '\\n\\n### Response:\\n' -}}
{%- endif -%}"""


@dataclass
class SFTConfig(TrainConfig):
    """Instruction tuning of a GPT-2 (ours or OpenAI's). The defaults are the article's: AdamW at 5e-5 with
    weight decay 0.1 and a constant rate, batches of 8, two epochs, an 85/5/10 train/validation/test split."""

    output_dir: str = "runs/sft"
    model: str = field(default="", metadata={"help": "Base model: a folder (scripts/pretrain.py's final/, any GPT-2 folder) or a Hub id."})
    # Data.
    dataset: str = field(default="", metadata={"help": "Instruction records: a .json/.jsonl file, or a Hub dataset id / local dataset folder."})
    dataset_config: str = ""
    dataset_split: str = "train"
    val_fraction: float = field(default=0.05, metadata={"help": "Share of records held out for validation."})
    test_fraction: float = field(default=0.10, metadata={"help": "Share of records held out for the test replies."})
    split_seed: int = field(default=0, metadata={"help": "0: split in file order (train, then test, then validation), as the article did; N: shuffle with seed N first."})
    chat_template: str = field(default="alpaca", metadata={"help": "'alpaca' or a Jinja file that marks each reply and its end token as a generation block."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per example (prompt, reply, end token); at most the model's context."})
    overlong: str = field(default="truncate", metadata={"help": "Longer records: truncate (cut the reply's end) | drop."})
    packing: bool = field(default=False, metadata={"help": "Pack several examples into each row of max_length tokens; attention stays inside each."})
    epochs: float = 2.0
    dropout: float = field(default=0.0, metadata={"help": "GPT-2's dropout while tuning; the article used none (OpenAI's config says 0.1)."})
    # Test split: replies, ROUGE-L and an optional LLM judge.
    max_new_tokens: int = 256
    generation_batch_size: int = 32
    base_replies: int = field(default=5, metadata={
        "help": "The base model also answers the first N test prompts (same template, greedy), beside the tuned "
                "model's replies in test_responses.jsonl: what tuning changed."})
    judge_url: str = field(default="", metadata={"help": "OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 (Ollama)."})
    judge_model: str = field(default="", metadata={"help": "The judge's model name on that endpoint, e.g. llama3."})
    # Engine defaults changed for fine-tuning.
    learning_rate: float = 5e-5
    lr_scheduler: str = "constant"
    adam_beta2: float = 0.999
    micro_batch_size: int = 8
    log_every: int = 5
    eval_batches: int = 0

    renamed: ClassVar[dict[str, str]] = {**TrainConfig.renamed, "data": "dataset", "data_config": "dataset_config",
                                         "data_split": "dataset_split"}


def check_config(cfg: SFTConfig) -> None:
    if not cfg.model or not cfg.dataset:
        raise UserError("set --model (a base model folder or Hub id) and --dataset (instruction records)")
    check_source(cfg.model, "model", MODEL_FILES)  # before start_run locks the output folder
    if cfg.tokens_per_step:
        raise UserError("tokens_per_step does not apply to SFT (batches vary in length); "
                        "set gradient_accumulation_steps instead")
    if not cfg.epochs and not cfg.max_steps and not cfg.max_tokens:  # engine.run_length's rule, before any work
        raise UserError("set epochs, max_steps or max_tokens to a positive number")


# ---------------------------------------------------------------------------------------------- records

# Local files of records that datasets reads by their suffix; any other file is read as JSON records.
DATASETS_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".txt")


def read_records(name: str, config: str = "", split: str = "train") -> list[tuple[str, object]]:
    """Every record with where it came from ("data.json: record 7"), for one-line errors.

    Local .json/.jsonl files are parsed here rather than by `datasets`: its JSON loader reports a bad
    record as an Arrow type error without saying which record it was.
    """
    path = Path(name).expanduser()
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise UserError(f"data file not found: {name}")
        return _read_json_records(path)
    if path.is_file() and path.suffix.lower() not in DATASETS_SUFFIXES:
        # datasets picks a file's reader by its suffix, and of any other file (a binary one, records saved
        # without a suffix) says it "couldn't find any data file", though the file is there: read as JSON
        # records, it is refused with what is wrong with it.
        return _read_json_records(path)
    if name.startswith(("/", ".", "~")) and not path.exists():
        raise UserError(f"data path not found: {name}")
    from datasets import load_dataset

    with could_not_load("dataset", name, f" (split {split})"):
        rows = load_dataset(name, config or None, split=split)
    return [(f"{name} ({split}): record {i + 1}", row) for i, row in enumerate(rows)]


def _read_json_records(path: Path) -> list[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: cannot be read as JSON or text: not UTF-8 (byte {e.start}; a binary file?); "
                        "give JSON or JSON Lines records, or a .csv or .parquet file of them") from None
    whole = None
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
            # else JSON lines, which datasets' to_json writes under a .json name too
    if whole is not None:  # an array of records, or a single one
        records = whole if isinstance(whole, list) else [whole]
        return [(f"{path}: record {i + 1}", r) for i, r in enumerate(records)]
    out = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            where = f"{path}: record {len(out) + 1} (line {line_number})"
            try:
                out.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    return out


def to_messages(record, where: str) -> list[dict]:
    """A record as a chat ending in the reply to learn. Text is stripped of surrounding whitespace: a
    reply starting with a newline would merge with the template's newline into one token, and the
    prompt the model trains on would then differ from the one it is given when generating."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, found {type(record).__name__}")
    if "messages" in record:
        return _chat_messages(record["messages"], where)
    if "prompt" in record or "completion" in record:
        return [{"role": "user", "content": _text(record, "prompt", where)},
                {"role": "assistant", "content": _text(record, "completion", where)}]
    if "instruction" in record or "output" in record:
        return [{"role": "user", "content": _text(record, "instruction", where),
                 "input": _text(record, "input", where, required=False)},
                {"role": "assistant", "content": _text(record, "output", where)}]
    raise UserError(f"{where}: expected instruction/output, prompt/completion or messages fields; "
                    f"found {', '.join(map(str, record)) or 'none'}")


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise UserError(f"{where}: '{key}' is missing")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, found {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: '{key}' is empty")
    return value.strip()


def _chat_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"{where}: message {i} needs a role of system, user or assistant")
        if m["role"] == "system" and i > 1:
            raise UserError(f"{where}: message {i}: a system message can only come first")
        out.append({"role": m["role"], "content": _text(m, "content", f"{where}: message {i}")})
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's reply")
    return out


def split_records(records: list, val_fraction: float, test_fraction: float, seed: int = 0):
    """(train, validation, test). The article's split: the first 85% train, the next 10% test, the last
    5% validation (935/110/55 of its 1,100 records), in file order, or after a shuffle with `seed`."""
    if min(val_fraction, test_fraction) < 0 or val_fraction + test_fraction >= 1:
        raise UserError("val_fraction and test_fraction must be >= 0 and add up to less than 1")
    if seed:
        records = records.copy()
        random.Random(seed).shuffle(records)
    n = len(records)
    # The epsilon keeps products such as 100 x 0.29 = 28.999999999999996 from rounding down.
    n_test, n_val = int(n * test_fraction + 1e-9), int(n * val_fraction + 1e-9)
    n_train = n - n_test - n_val
    return records[:n_train], records[n_train + n_test:], records[n_train:n_train + n_test]


# ---------------------------------------------------------------------------------------------- tokens

def resolve_chat_template(name: str) -> str:
    if name == "alpaca":
        return ALPACA_TEMPLATE
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"chat_template must be 'alpaca' or a Jinja file; not found: {name}")
    template = path.read_text()
    if not re.search(r"\{%-?\s*generation\s*-?%\}", template):
        raise UserError(f"chat template {name}: no {{% generation %}} block, so nothing marks which tokens "
                        "carry loss; wrap each assistant reply and its end token in one")
    return template


def with_chat_template(tokenizer, template: str):
    """The chat template that training, evaluation and the saved final/ folder share, and a pad token
    (GPT-2 has none; padded positions carry no loss and no attention, so the end-of-text id serves)."""
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss: prompts, earlier turns' headers, padding


def encode_chat(tokenizer, messages: list[dict], where: str) -> Example:
    """Token ids of a whole chat; labels are the ids of the replies and their end tokens, -100 elsewhere."""
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    # The tokens before the last reply must be exactly the generation prompt of the chat without it,
    # or the model would be trained on one prompt and given another.
    prompt = chat_prompt_ids(tokenizer, messages[:-1])
    if ids[:len(prompt)] != prompt or len(ids) == len(prompt) or not mask[len(prompt)]:
        raise UserError(f"{where}: the chat template's prompt for a reply differs from the one it writes before "
                        "that reply in training (fix the template)")
    return Example(ids, [t if m else -100 for t, m in zip(ids, mask)])


def fit_length(examples: list[Example], max_length: int, overlong: str) -> tuple[list[Example], int, int]:
    """Examples of at most max_length tokens, and how many were truncated and dropped.

    truncate: the end is cut (the reply loses its end token); one left with no reply token is dropped.
    """
    if overlong not in ("truncate", "drop"):
        raise UserError(f"overlong must be truncate or drop, not '{overlong}'")
    kept, truncated, dropped = [], 0, 0
    for ex in examples:
        if len(ex.input_ids) <= max_length:
            kept.append(ex)
            continue
        cut = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if overlong == "truncate" and any(t != -100 for t in cut.labels[1:]):  # column 0 is never a target
            kept.append(cut)
            truncated += 1
        else:
            dropped += 1
    return kept, truncated, dropped


def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Rows of several examples, at most max_length tokens each: best fit, each example into the fullest
    row that still has room for it (a sorted list of free space keeps this O(n log n))."""
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for ex in examples:
        i = bisect.bisect_left(free, (len(ex.input_ids), -1))
        space, row = free.pop(i) if i < len(free) else (max_length, len(rows))
        if row == len(rows):
            rows.append([])
        rows[row].append(ex)
        bisect.insort(free, (space - len(ex.input_ids), row))
    return rows


def collate(units: list[list[Example]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """One micro-batch: a row per unit (one example, or several when packing), padded on the right.

    Unpacked rows need no attention mask: padding comes after every real token, so causal attention
    alone keeps it out of sight, and it carries no loss. Without a mask, sdpa runs its causal flash
    kernel rather than the masked memory-efficient one (slower, and known to give NaN for some padding
    patterns: pytorch#109517). Packed rows get position_ids restarting at 0 for every example, from
    which the engine builds a block-diagonal causal mask; the padding run gets positions of its own,
    so it is a separate "document" that nothing attends to.
    """
    width = max(sum(len(ex.input_ids) for ex in unit) for unit in units)
    input_ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    labels = torch.full((len(units), width), -100, dtype=torch.long)
    positions = torch.zeros((len(units), width), dtype=torch.long)
    for row, unit in enumerate(units):
        at = 0
        for ex in unit:
            n = len(ex.input_ids)
            input_ids[row, at:at + n] = torch.tensor(ex.input_ids)
            labels[row, at:at + n] = torch.tensor(ex.labels)
            positions[row, at:at + n] = torch.arange(n)
            at += n
        positions[row, at:] = torch.arange(width - at)
    batch = {"input_ids": input_ids, "labels": labels}
    if packing:
        batch["position_ids"] = positions
    return batch


class SFTBatches:
    """This process's training micro-batches, epoch after epoch; the engine decides when to stop.

    Each epoch shuffles the units with (seed, epoch); process k takes every num_processes-th unit of
    that order, and all take the same count (the remainder waits for a later epoch's shuffle), so they
    step together. The state is (epoch, position, seed): a resumed run reads exactly the batches an
    uninterrupted one would.
    """

    def __init__(self, units: list[list[Example]], *, micro_batch_size: int, pad_id: int, packing: bool, seed: int,
                 process_index: int = 0, num_processes: int = 1):
        self.units, self.micro_batch_size, self.pad_id, self.packing = units, micro_batch_size, pad_id, packing
        self.process_index, self.num_processes = process_index, num_processes
        self.share = len(units) // num_processes
        if self.share == 0:
            raise UserError(f"{len(units)} training examples cannot be shared among {num_processes} processes")
        self.seed, self.epoch, self.position = seed, 0, 0
        self._order = None

    def batches_per_epoch(self) -> int:
        return math.ceil(self.share / self.micro_batch_size)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))
            self._order = order[self.process_index::self.num_processes][:self.share]
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= self.share:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        taken = self._epoch_order()[self.position:self.position + self.micro_batch_size]
        self.position += len(taken)
        return collate([self.units[i] for i in taken], self.pad_id, self.packing)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:  # the units themselves (packing) were laid out with the seed too
            raise UserError(f"the checkpoint's data order comes from seed {state['seed']}; "
                            f"resume with --seed {state['seed']}")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


class SFTData:
    """The records of `cfg.dataset`, split, tokenized through the chat template, length-checked and (when
    packing) packed: what the engine trains and validates on, and the test split's chats."""

    def __init__(self, cfg: SFTConfig, tokenizer, context: int):
        self.cfg, self.tokenizer, self.context = cfg, tokenizer, context
        self.max_length = min(cfg.max_length, context)
        records = read_records(cfg.dataset, cfg.dataset_config, cfg.dataset_split)
        if not records:
            raise UserError(f"dataset {cfg.dataset}: no records")
        chats = [(where, to_messages(record, where)) for where, record in records]  # every record checked first
        train, val, test = split_records(chats, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        self.counts = {"records": len(chats)}
        self.train = self._examples("train", train)
        self.val = self._examples("validation", val)
        # Test chats end in the reference reply; the prompt is everything before it, kept tokenized for the replies.
        prompts = [(messages, chat_prompt_ids(tokenizer, messages[:-1])) for _, messages in test]
        self.test = [messages for messages, ids in prompts if len(ids) < context]
        self.test_prompts = [ids for _, ids in prompts if len(ids) < context]
        self.counts["test"], self.counts["test_too_long"] = len(self.test), len(test) - len(self.test)
        if not self.train:
            raise UserError(f"dataset {cfg.dataset}: no training examples left after the split and the length limit")

    def _examples(self, split: str, chats: list) -> list[Example]:
        examples = [encode_chat(self.tokenizer, messages, where) for where, messages in chats]
        kept, truncated, dropped = fit_length(examples, self.max_length, self.cfg.overlong)
        self.counts.update({split: len(kept), f"{split}_truncated": truncated, f"{split}_dropped": dropped})
        return kept

    def _units(self, examples: list[Example], seed: int | None) -> list[list[Example]]:
        if not self.cfg.packing:
            return [[ex] for ex in examples]
        if seed is not None:  # pack in a shuffled order, so rows mix the file's neighbours
            examples = [examples[i] for i in np.random.default_rng(seed).permutation(len(examples))]
        return pack(examples, self.max_length)

    @cached_property
    def _train_units(self) -> list[list[Example]]:
        # Packed once: the engine asks for the batches and for the steps of a pass over them.
        return self._units(self.train, self.cfg.seed)

    def train_batches(self, process_index: int, num_processes: int) -> SFTBatches:
        return SFTBatches(self._train_units, micro_batch_size=self.cfg.micro_batch_size,
                          pad_id=self.tokenizer.pad_token_id, packing=self.cfg.packing, seed=self.cfg.seed,
                          process_index=process_index, num_processes=num_processes)

    def eval_batches(self, process_index: int, num_processes: int) -> list[dict]:
        """This process's share (hf_gpt.data.process_share) of the validation split."""
        units, size = self._units(self.val, None), self.cfg.micro_batch_size
        batches = (collate(units[i:i + size], self.tokenizer.pad_token_id, self.cfg.packing)
                   for i in range(0, len(units), size))
        return process_share(batches, process_index, num_processes, self.cfg.eval_batches)

    def steps_per_epoch(self, num_processes: int, accumulation: int) -> int:
        """Optimizer steps per pass over the training split (micro-batches left over roll into the next)."""
        batches = self.train_batches(0, num_processes).batches_per_epoch()
        return max(1, batches // accumulation)

    def summary(self) -> str:
        c = self.counts
        lines = [f"{c['records']} records: {c['train']} train, {c['validation']} validation, {c['test']} test"]
        if self.max_length < self.cfg.max_length:
            lines.append(f"max_length {self.cfg.max_length} capped at the model's context, {self.max_length} tokens")
        for split in ("train", "validation"):
            if c[f"{split}_truncated"] or c[f"{split}_dropped"]:
                lines.append(f"{split}: {c[f'{split}_truncated']} truncated to {self.max_length} tokens, "
                             f"{c[f'{split}_dropped']} dropped (overlong: {self.cfg.overlong})")
        if c["test_too_long"]:
            lines.append(f"test: {c['test_too_long']} records skipped, their prompt fills the "
                         f"{self.context}-token context")
        return "\n".join(lines)
