"""Run configuration: dataclasses filled from a YAML recipe, then from command-line overrides.

`load_config(PretrainConfig)` reads `--config FILE` (unknown keys are errors), then lets every field
be overridden on the command line (`--max_steps 200`). Parsing is `transformers.HfArgumentParser`,
so `--help` lists every field with its help text.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml
from accelerate.utils import LoggerType
from tqdm import tqdm
from transformers import HfArgumentParser

from .files import atomic_write


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


class Stopped(Exception):
    """A run stopped by a signal once its checkpoint is saved: run_cli exits with 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal ended, so that a script or a
    batch scheduler tells a stopped run (continue it with --resume) from a finished one (exit 0)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def first_line(e: Exception) -> str:
    """An exception as `Type: the first line of its message`, for a one-line error."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


@contextlib.contextmanager
def could_not_load(what: str, name: str, where: str = ""):
    """Any failure inside as one line, "<what> '<name>' could not be loaded<where>: Type: first line": loaders
    raise many kinds (offline, 404, gated, no such split, broken weights), and each is news of one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{what} '{name}' could not be loaded{where}: {first_line(e)}") from None


@dataclass
class TrainConfig:
    """Fields of the shared training loop (hf_gpt.engine); every recipe has them."""

    output_dir: str = field(default="runs/default", metadata={"help": "Run folder: checkpoints, metrics, final model."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir from its latest checkpoint."})
    seed: int = 1337

    # Length of the run: max_steps wins; then max_tokens / tokens per step; then epochs.
    max_steps: int = 0
    max_tokens: int = 0
    epochs: float = field(default=0.0, metadata={
        "help": "Passes over the training data, when max_steps and max_tokens are 0 (SFT, LoRA: a streamed corpus "
                "has no known length)."})

    # Batch: tokens per optimizer step = micro_batch_size x block_size x accumulation x processes.
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = field(
        default=0, metadata={"help": "0: derived from tokens_per_step (or 1 when that is 0 too)."}
    )
    tokens_per_step: int = field(default=0, metadata={"help": "Target tokens per optimizer step, all processes."})

    # Optimizer and schedule.
    learning_rate: float = 6e-4
    lr_scheduler: str = field(default="cosine", metadata={"help": "cosine | wsd | constant | linear"})
    warmup_steps: int = 0
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "Warmup as a share of the run's steps, rounded up (transformers 4's warmup_ratio; 5 reads a warmup_steps "
                "below 1 so), for warmup_steps 0: it follows the run's length when the token budget or the tokens per "
                "step change."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine/wsd end at learning_rate x this."})
    decay_ratio: float = field(default=0.2, metadata={"help": "wsd: fraction of steps spent decaying."})
    weight_decay: float = 0.1
    weight_decay_everywhere: bool = field(
        default=False, metadata={"help": "Decay biases, LayerNorm and embeddings too (the seed article's setup)."}
    )
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "0 disables clipping."})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw | muon: Muon (torch.optim.Muon's update) for the attention and MLP weight matrices, AdamW with "
                "the fields above for embeddings, LayerNorms and biases (docs/optimizers.md). Not for LoRA or FSDP."})
    muon_learning_rate: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_weight_decay: float = field(default=0.1, metadata={
        "help": "Muon's decoupled weight decay: each step multiplies its matrices by 1 - muon_learning_rate x this."})
    muon_adjust_lr: str = field(default="original", metadata={
        "help": "How Muon scales its rate by each matrix's (out, in) shape, torch.optim.Muon's adjust_lr_fn: original "
                "(sqrt(max(1, out/in))) | match_rms_adamw (0.2 sqrt(max(out, in)): AdamW's rates carry over)."})
    muon_split_qkv: bool = field(default=True, metadata={
        "help": "Orthogonalise attention's query, key and value as three matrices, as modded-nanogpt and nanochat "
                "do; false: c_attn as one."})

    # Speed.
    mixed_precision: str = field(default="", metadata={"help": "no | bf16 | fp16; empty: accelerate's config."})
    tf32: bool = True
    compile: bool = False
    compile_mode: str = field(default="", metadata={
        "help": "torch.compile mode: '' (default), max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs: "
                "+0.4 percent at one micro-batch a step, failed with accumulation; torch 2.11, "
                "docs/results/throughput.md), max-autotune."})
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa | eager | flex_attention | varlen (packed documents through a variable-length flash kernel; GPU)"})
    varlen_kernel: str = field(default="auto", metadata={
        "help": "varlen's kernel on a GPU: torch (PyTorch's FlashAttention-2) | fa4 (flash-attn-4, Hopper and "
                "Blackwell GPUs) | auto (fa4 where it runs, else torch)"})
    fused_cross_entropy: bool = field(
        default=False, metadata={"help": "GPU: Liger's fused linear + cross-entropy, logits never materialised."})

    read_ahead: int = field(default=0, metadata={
        "help": "Micro-batches read ahead of the loop in a background thread, so that tokenizing a streamed corpus "
                "does not stall the GPU between steps; 0: read in the loop's thread. Resume stays exact."})

    # Evaluation, logging, checkpoints.
    eval_every: int = field(default=0, metadata={
        "help": "Steps between evaluations; 0: after every pass over the training data where its size is known "
                "(SFT, LoRA), else only at the end, which always evaluates."})
    eval_batches: int = field(default=8, metadata={
        "help": "Validation micro-batches per process at each evaluation; 0: the whole validation split."})
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    report_to: str = field(default="", metadata={"help": "An Accelerate tracker, e.g. tensorboard or wandb."})
    sample_prompts: list[str] = field(default_factory=list, metadata={
        "help": "Continued at every evaluation into metrics.jsonl (sampled: temperature 0.8, top-k 40, a fixed "
                "seed); the flag alone empties the list."})
    max_new_tokens: int = field(default=48, metadata={
        "help": "New tokens of each generated text: the evaluation samples (and SFT's test replies)."})
    stop_at_val_loss: float = field(default=0.0, metadata={
        "help": "End the run at the first evaluation at or under this validation loss; summary.json's time_to_target "
                "says when (training seconds, evaluation and the first step apart). 0: off."})
    hellaswag: str = field(default="", metadata={
        "help": "HellaSwag at every evaluation: a JSON Lines file (.jsonl, .jsonl.xz) with Rowan/hellaswag's fields, "
                "or Rowan/hellaswag (the Hub dataset's validation split); empty: none."})
    hellaswag_items: int = field(default=0, metadata={
        "help": "HellaSwag's first N items at each evaluation; 0: all (10,042 in the validation split)."})

    # Names this project used before it had one vocabulary (old -> new): refused with the new name.
    renamed: ClassVar[dict[str, str]] = {"sample_tokens": "max_new_tokens"}


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def read_yaml(path: str | Path, cls) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config {path}: not valid YAML ({e})".replace("\n", " ")) from None
    except UnicodeDecodeError as e:
        raise UserError(f"config {path}: not a YAML text file (byte {e.start} is not UTF-8); give a recipe such as "
                        "configs/default.yaml") from None
    if not isinstance(values, dict):
        raise UserError(f"config {path}: expected a mapping of field: value")
    for key in values:
        if key in cls.renamed:
            raise UserError(f"config {path}: {key} is now called {cls.renamed[key]}")
    unknown = sorted(set(values) - set(field_names(cls)))
    if unknown:
        raise UserError(f"config {path}: unknown key(s) {', '.join(unknown)} for {cls.__name__}")
    return values


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a script's docstring as written (its usage examples one per line) and the defaults that
    say something (not None, empty or False, nor one the help text names itself)."""

    def _get_help_string(self, action):
        if action.default in (None, "", False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ScriptParser(argparse.ArgumentParser):
    """The parser of every script: --help keeps the docstring's examples as written; a flag is never taken
    for an abbreviation of another (argparse would read a retired --text as --text_column); a flag has one
    spelling, with underscores (`--max-new-tokens` is refused with it), and a flag in `renamed` (old name ->
    new name) is refused with its new name; an error is one line."""

    def __init__(self, *args, renamed: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, formatter_class=_HelpFormatter, allow_abbrev=False, **kwargs)
        self.renamed = renamed or {}

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        for arg in args:
            name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
            if name in self.renamed:
                raise UserError(f"--{name} is now called --{self.renamed[name]}")
            if "-" in name and f"--{name.replace('-', '_')}" in self._option_string_actions:
                raise UserError(f"--{name} is spelt --{name.replace('-', '_')}")
        return super().parse_known_args(args, namespace)

    def error(self, message):
        # argparse prints the whole usage first (40 lines of fields for a recipe) and names each field twice.
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)
        self.exit(2, f"error: {message} (--help lists every field)\n")


class _ConfigParser(ScriptParser, HfArgumentParser):
    """A config dataclass's fields as flags. A list field takes zero values too, so that `--sample_prompts`
    alone empties it (HfArgumentParser asks for one or more); a field a recipe gives another default keeps
    the help text of the class that defines it."""

    def __init__(self, cls, **kwargs):
        super().__init__(cls, renamed=cls.renamed, **kwargs)
        # A recipe that changes a shared field's default keeps its meaning: the help of the class that defines it.
        helps = {f.name: f.metadata["help"] for klass in reversed(cls.__mro__) if dataclasses.is_dataclass(klass)
                 for f in dataclasses.fields(klass) if f.metadata.get("help")}
        for action in self._actions:
            if action.nargs == "+":
                action.nargs = "*"
            if action.help is None:
                action.help = helps.get(action.dest)
            for alias in [o for o in action.option_strings if "-" in o[2:]]:  # HfArgumentParser's --max-new-tokens
                action.option_strings.remove(alias)
                del self._option_string_actions[alias]


SHUFFLE_ROWS_HELP = ("Micro-batches are drawn at random from a buffer of this many rows of block_size tokens (the "
                     "files read in a new order every epoch; token shards: blocks in a new order every epoch, "
                     "whatever the number); 0: rows in the order read, as runs before it.")


# Numbers that count something and must be at least 1; every other number of a config must not be negative
# (0 means "off" or "derived" where it is allowed), and these are shares of something, at most 1.
AT_LEAST_ONE = {"micro_batch_size", "log_every", "block_size", "n_layer", "n_head", "n_embd", "tokenizer_vocab_size",
                "tokenizer_train_documents", "max_length", "generation_batch_size", "shard_tokens"}
FRACTIONS = {"val_fraction", "test_fraction", "warmup_ratio", "min_lr_ratio", "decay_ratio", "dropout",
             "lora_dropout", "adam_beta1", "adam_beta2", "muon_momentum"}


# Fields that take one of a fixed set of values, by name (a name means one thing in every config that has it):
# check() refuses any other value before any work, naming the field and these. '' is "not set" where allowed.
CHOICES: dict[str, tuple[str, ...]] = {
    "lr_scheduler": ("cosine", "wsd", "constant", "linear"),
    "mixed_precision": ("", "no", "bf16", "fp16"),
    "compile_mode": ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "attn_implementation": ("sdpa", "eager", "flex_attention", "varlen"),
    "varlen_kernel": ("auto", "torch", "fa4"),
    "report_to": ("", *(t.value for t in LoggerType)),
    "crop": ("", "random", "start"),
    "data_encoding_errors": ("strict", "replace", "ignore"),
    "overlong": ("truncate", "drop"),
    "stopping_strategy": ("all_exhausted", "first_exhausted", "all_exhausted_without_replacement"),
    "optimizer": ("adamw", "muon"),  # optim.OPTIMIZERS' names (a test holds them equal)
    "muon_adjust_lr": ("original", "match_rms_adamw"),  # torch.optim.Muon's adjust_lr_fn
}


def dataset_names(dataset: str) -> list[str]:
    """The sources a pretraining `dataset` names: one, or several separated by commas, mixed by dataset_weights."""
    return [name.strip() for name in dataset.split(",") if name.strip()]


def check_choice(name: str, value) -> None:
    if value not in CHOICES[name]:
        allowed = ", ".join(c or "''" for c in CHOICES[name])
        raise UserError(f"{name} must be one of {allowed}, not {value!r}")


def check(cfg) -> None:
    """Values out of range stop a run before any work (training its tokenizer alone takes a minute)."""
    for name in field_names(type(cfg)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low = 1 if name in AT_LEAST_ONE else 0
        if not value >= low:  # NaN too
            raise UserError(f"{name} must be {'1 or more' if low else '0 or more'}, not {value}")
        if math.isinf(value):  # a learning rate of inf diverges at its second step
            raise UserError(f"{name} must be a finite number, not {value}")
        if name in FRACTIONS and value > 1:
            raise UserError(f"{name} must be between 0 and 1, not {value}")
    for name in CHOICES:
        if name in field_names(type(cfg)):
            check_choice(name, getattr(cfg, name))
    attention = getattr(cfg, "attn_implementation", "sdpa")
    if attention in ("flex_attention", "varlen") and getattr(cfg, "dropout", 0):
        raise UserError(f"{attention} has no attention dropout: set --dropout 0 or --attn_implementation sdpa")
    weights = getattr(cfg, "dataset_weights", [])
    if weights and len(weights) != len(dataset_names(cfg.dataset)):
        raise UserError(f"dataset_weights gives {len(weights)} weight(s) for the {len(dataset_names(cfg.dataset))} "
                        f"source(s) of dataset {cfg.dataset!r}: one per source, in order")
    if any(not w > 0 for w in weights):
        raise UserError(f"dataset_weights must all be above 0, not {weights}: leave a source out of dataset instead")
    if isinstance(cfg, TrainConfig) and cfg.warmup_steps and cfg.warmup_ratio:
        raise UserError(f"set warmup_steps ({cfg.warmup_steps}) or warmup_ratio ({cfg.warmup_ratio}), not both "
                        "(--warmup_ratio 0 undoes a recipe's share)")


def load_config(cls, argv: list[str] | None = None, description: str | None = None):
    """YAML recipe (``--config``) first, command-line overrides on top; returns a checked ``cls`` instance."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _ConfigParser(cls, description=description)
    parser.add_argument("--config", help="YAML recipe; any field can also be given on the command line.")
    known, _ = parser.parse_known_args(argv)  # only to find --config before full parsing
    if known.config:
        parser.set_defaults(**read_yaml(known.config, cls))
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "config"}
    cfg = cls(**values)
    check(cfg)
    return cfg


def changed_fields(saved: dict, cfg) -> dict[str, str]:
    """The fields of `cfg` whose values differ from `saved` (a run's config.yaml as a dict, or another config's),
    as `field old -> new`. Retired names in `saved` read as their new ones; fields `saved` lacks (added to the
    code after that run started) and output_dir/resume are left out: there is nothing to compare."""
    saved = {type(cfg).renamed.get(k, k): v for k, v in saved.items()}
    return {k: f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k not in ("output_dir", "resume") and k in saved and saved[k] != v}


def save_config(cfg, path: str | Path) -> None:
    atomic_write(Path(path), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def run_cli(main) -> None:
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2, a run stopped by a signal
    (Stopped, which the engine already announced) exit code 128 + the signal's number."""
    try:
        main()
    except Stopped as e:
        sys.exit(128 + e.signum)
    except UserError as e:
        # The line must not land on the end of a progress bar: close the bars still open (an error inside their
        # loop), and where no terminal takes the cursor back to the start of the line (a log), start a new one.
        for bar in list(tqdm._instances):
            bar.close()
        print(("" if sys.stderr.isatty() else "\n") + f"error: {e}", file=sys.stderr)
        sys.exit(2)


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining a fresh GPT-2. The defaults are the offline run: Python's own standard library as the
    corpus, a BPE trained on it, a small model that learns to write Python on a CPU in about five minutes."""

    output_dir: str = "runs/stdlib-tiny"
    # Data.
    dataset: str = field(default="stdlib", metadata={
        "help": "Hub id, local file/folder (txt, md, jsonl, parquet) or 'stdlib'; several, separated by commas, are "
                "mixed document by document (dataset_weights)."})
    dataset_weights: list[float] = field(default_factory=list, metadata={
        "help": "A mixture's weight of each source of dataset, in order: the share of its documents (normalised; "
                "empty: equal shares)."})
    stopping_strategy: str = field(default="all_exhausted", metadata={
        "help": "When a mixture's epoch ends (datasets.interleave_datasets): all_exhausted (once every source was "
                "read whole, the others started again meanwhile) | first_exhausted (when one source runs out) | "
                "all_exhausted_without_replacement (every document once; the shares drift as sources run out)."})
    dataset_config: str = ""
    dataset_split: str = "train"
    text_column: str = "text"
    eval_split: str = field(default="", metadata={
        "help": "Validation split; empty: a local folder's validation files (validation.parquet, ...), else "
                "documents held out by hash."})
    val_fraction: float = field(default=0.01, metadata={"help": "Share of documents held out (by hash) for validation."})
    val_documents: int = field(default=0, metadata={
        "help": "Validation: the stream's first N documents, left out of training on every process (a streamed "
                "Hub dataset without a validation split: nothing to filter from the whole stream first); 0: "
                "documents held out by hash at val_fraction."})
    data_encoding_errors: str = field(default="strict", metadata={"help": "Local text files: strict | replace | ignore."})
    block_size: int = 256
    document_masking: bool = field(default=True, metadata={"help": "Attention stays inside each packed document."})
    crop: str = field(default="random", metadata={"help": "'' pack whole documents | random | start: one block_size window per long document."})
    shuffle_rows: int = field(default=2048, metadata={"help": SHUFFLE_ROWS_HELP})
    # Tokenizer.
    tokenizer: str = field(default="train", metadata={"help": "'train' (byte-level BPE on the corpus), a Hub id or a folder."})
    tokenizer_vocab_size: int = 4096
    tokenizer_train_documents: int = 600
    # Model.
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    qkv_bias: bool = field(default=True, metadata={
        "help": "false: the query, key and value projections' bias held at zero and never trained, as if absent "
                "(the seed article's model had none); the model is still a plain GPT2LMHeadModel."})
    vocab_size: int = field(default=0, metadata={"help": "0: the tokenizer's size rounded up to a multiple of 64."})
    # Schedule for the quick run.
    micro_batch_size: int = 16
    max_steps: int = 400
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    sample_prompts: list[str] = field(default_factory=lambda: ["import os\n", "def ", "class "])
    push_to_hub: str = field(default="", metadata={"help": "Hub repo id to publish final/ to at the end."})

    renamed: ClassVar[dict[str, str]] = {**TrainConfig.renamed, "holdout_fraction": "val_fraction"}
