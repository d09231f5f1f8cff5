"""Run configuration: dataclasses filled from a YAML recipe, then from command-line overrides.

`load_config(PretrainConfig)` reads `--config FILE` (unknown keys are errors), then lets every field
be overridden on the command line (`--max_steps 200`). Parsing is `transformers.HfArgumentParser`,
so `--help` lists every field with its help text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm
from transformers import HfArgumentParser


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


def first_line(e: Exception) -> str:
    """An exception as `Type: the first line of its message`, for a one-line error."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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

    # Length of the run: max_steps wins; otherwise max_tokens / tokens per step.
    max_steps: int = 0
    max_tokens: int = 0

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

    # Speed.
    mixed_precision: str = field(default="", metadata={"help": "no | bf16 | fp16; empty: accelerate's config."})
    tf32: bool = True
    compile: bool = False
    compile_mode: str = field(default="", metadata={
        "help": "torch.compile mode: '' (default), max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs), max-autotune."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager | flex_attention"})
    fused_cross_entropy: bool = field(
        default=False, metadata={"help": "GPU: Liger's fused linear + cross-entropy, logits never materialised."})

    # Evaluation, logging, checkpoints.
    eval_every: int = 0
    eval_batches: int = field(default=8, metadata={"help": "Micro-batches of validation per process; 0: the whole split."})
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    report_to: str = field(default="", metadata={"help": "An Accelerate tracker, e.g. tensorboard or wandb."})
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 48


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
    if not isinstance(values, dict):
        raise UserError(f"config {path}: expected a mapping of field: value")
    unknown = sorted(set(values) - set(field_names(cls)))
    if unknown:
        raise UserError(f"config {path}: unknown key(s) {', '.join(unknown)} for {cls.__name__}")
    return values


class _Parser(HfArgumentParser):
    def error(self, message):
        # argparse prints the whole usage first (40 lines of fields for a recipe) and names each field twice.
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)
        self.exit(2, f"error: {message} (--help lists every field)\n")


# Numbers that count something and must be at least 1; every other number of a config must not be negative
# (0 means "off" or "derived" where it is allowed), and these are shares of something, at most 1.
AT_LEAST_ONE = {"micro_batch_size", "log_every", "block_size", "n_layer", "n_head", "n_embd", "tokenizer_vocab_size",
                "tokenizer_train_documents", "max_length", "generation_batch_size", "shard_tokens"}
FRACTIONS = {"holdout_fraction", "val_fraction", "test_fraction", "min_lr_ratio", "decay_ratio", "dropout",
             "lora_dropout", "adam_beta1", "adam_beta2"}


def check(cfg) -> None:
    """Values out of range stop a run before any work (training its tokenizer alone takes a minute)."""
    for name in field_names(type(cfg)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low = 1 if name in AT_LEAST_ONE else 0
        if not value >= low:  # NaN too
            raise UserError(f"{name} must be {'1 or more' if low else '0 or more'}, not {value}")
        if name in FRACTIONS and value > 1:
            raise UserError(f"{name} must be between 0 and 1, not {value}")


def load_config(cls, argv: list[str] | None = None, description: str | None = None):
    """YAML recipe (``--config``) first, command-line overrides on top; returns a checked ``cls`` instance."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(cls, description=description)
    parser.add_argument("--config", help="YAML recipe; any field can also be given on the command line.")
    known, _ = parser.parse_known_args(argv)  # only to find --config before full parsing
    if known.config:
        parser.set_defaults(**read_yaml(known.config, cls))
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "config"}
    cfg = cls(**values)
    check(cfg)
    return cfg


def save_config(cfg, path: str | Path) -> None:
    from .files import atomic_write

    atomic_write(Path(path), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def run_cli(main) -> None:
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
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
    dataset: str = field(default="stdlib", metadata={"help": "Hub id, local file/folder (txt, md, jsonl, parquet) or 'stdlib'."})
    dataset_config: str = ""
    dataset_split: str = "train"
    text_column: str = "text"
    eval_split: str = field(default="", metadata={
        "help": "Validation split; empty: a local folder's validation files (validation.parquet, ...), else "
                "documents held out by hash."})
    holdout_fraction: float = field(default=0.01, metadata={"help": "Share of documents held out for validation."})
    data_encoding_errors: str = field(default="strict", metadata={"help": "Local text files: strict | replace | ignore."})
    block_size: int = 256
    document_masking: bool = field(default=True, metadata={"help": "Attention stays inside each packed document."})
    crop: str = field(default="random", metadata={"help": "'' pack whole documents | random | start: one block_size window per long document."})
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
