"""Loading what was saved: a tokenizer, a model or a PEFT adapter, from a folder or the Hub. Every recipe and
script loads through here, so a failure is always one line that names what could not be loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from .config import UserError, could_not_load
from .files import damaged_file
from .model import attention_name

# A model folder holds one of these: save_pretrained's config, or a PEFT adapter's.
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# lm-eval's fallback context length when neither the config nor the tokenizer names one.
DEFAULT_CONTEXT = 2048


def looks_local(name_or_path: str) -> bool:
    """Whether a name that is no folder was meant as one. A Hub id has the shape of a relative path
    (owner/name), so only these count: one that starts with '.', '/' or '~', or whose first part is a folder
    here, or is runs (the recipes' output folders: runs/nope is a run, even before runs/ exists). Otherwise it
    would go to the Hub, and fail as unreachable or unknown there."""
    parts = Path(name_or_path).parts
    return name_or_path.startswith((".", "/", "~", os.sep)) or (
        len(parts) > 1 and (parts[0] == "runs" or Path(parts[0]).is_dir()))


def check_source(name_or_path: str, what: str, files: tuple[str, ...]) -> None:
    """One clear line for the usual slips, before transformers answers them obscurely: a path that does not
    exist (taken for a Hub id, malformed or not), and a folder that holds none of `files` (a run folder, data)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in files):
            hint = f"; did you mean {path / 'final'}?" if (path / "final").is_dir() else ""
            raise UserError(f"{what} '{name_or_path}' could not be loaded: the folder has none of {', '.join(files)}"
                            f"{hint}")
        return
    if path.exists():
        raise UserError(f"{what} '{name_or_path}' could not be loaded: it is a file; give the folder that holds it")
    if looks_local(name_or_path):
        raise UserError(f"{what} '{name_or_path}' could not be loaded: no such folder")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise UserError(f"{what} '{name_or_path}' could not be loaded: no such folder, and not a Hub id "
                        "(owner/name)") from None


def adapter_base(name_or_path: str, what: str = "model") -> str:
    """The base model a PEFT adapter folder's adapter_config.json names. A local base that is not there (moved
    or deleted since; hf_gpt.lora records it as an absolute path) is said so, before PEFT takes the path for a
    malformed Hub id ("Repo id must be in the form ...")."""
    with could_not_load(what, name_or_path):
        base = json.loads((Path(name_or_path).expanduser() / "adapter_config.json").read_text())[
            "base_model_name_or_path"]
    if not Path(base).expanduser().is_dir() and looks_local(base):
        raise UserError(f"{what} '{name_or_path}' could not be loaded: its base model folder {base} "
                        "(base_model_name_or_path in its adapter_config.json) is missing; put the base back there, "
                        "or write where it is now into adapter_config.json")
    return base


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A folder's or Hub model's tokenizer; a PEFT adapter saved without one has its base model's."""
    folder = Path(name_or_path).expanduser()
    if (folder / "adapter_config.json").is_file() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        name_or_path = adapter_base(name_or_path, "tokenizer")
        folder = Path(name_or_path).expanduser()
    check_source(name_or_path, "tokenizer", TOKENIZER_FILES)
    with could_not_load("tokenizer", name_or_path):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() and not (
                folder / "tokenizer_config.json").is_file():
            # OpenAI's original release: just vocab.json + merges.txt, which AutoTokenizer cannot place.
            tokenizer = GPT2TokenizerFast.from_pretrained(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{name_or_path}' has no end-of-text token")
    return tokenizer


def load_model(name_or_path: str, **options):
    """(model, tokenizer): load_causal_lm's model and its tokenizer (an adapter folder's own if it saved one,
    else its base model's)."""
    model, tokenizer = load_causal_lm(name_or_path, **options), load_tokenizer(name_or_path)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # an id past the table is an IndexError deep inside the first forward
        raise UserError(f"model '{name_or_path}': its tokenizer has {len(tokenizer):,} tokens, more than the model's "
                        f"{rows:,} embeddings; put the tokenizer the model was trained with in its folder")
    return model, tokenizer


def load_causal_lm(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "sdpa", **config):
    """The model of a Hub id, a Hub-format folder, or a PEFT adapter folder, in eval mode.

    float32 by default, also for training: mixed precision keeps float32 master weights, and from_pretrained
    would otherwise load a bf16 checkpoint as bf16. `attn_implementation` is a config's choice (flex_attention
    included); `config` overrides config.json entries (e.g. dropout). A folder with adapter_config.json is a
    PEFT adapter: it is loaded on the base model its config names. AutoPeftModelForCausalLM also grows the
    base's embeddings when the adapter's tokenizer added a token (hf_gpt.lora's trigger token).
    """
    check_source(name_or_path, "model", MODEL_FILES)
    path = Path(name_or_path).expanduser()  # as check_source reads it: ~/runs/me/adapter is a folder
    source = str(path) if path.exists() else name_or_path
    options = {"dtype": dtype, "attn_implementation": attention_name(attn_implementation), **config}
    if (path / "adapter_config.json").is_file():
        adapter_base(name_or_path)  # a base that moved is said so, not left to PEFT
    if path.is_dir() and (damage := damaged_file(path)):  # a run's final/ carries a manifest of its files
        raise UserError(f"model '{name_or_path}' could not be loaded: {damage}; it was damaged since it was saved; "
                        "replace the folder with a good copy")
    with could_not_load("model", name_or_path):
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(source, **options)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **options)
    return model.to(device).eval()


def context_length(model, tokenizer=None) -> int:
    """The longest input the model takes, looked up as lm-eval does: GPT-2 calls it n_positions, most others
    max_position_embeddings; else the tokenizer's limit, else lm-eval's default."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if value := getattr(model.config, attr, None):
            return int(value)
    if tokenizer is not None and tokenizer.model_max_length < 10**12:  # transformers' "no limit" is a huge sentinel
        return int(tokenizer.model_max_length)
    return DEFAULT_CONTEXT
