"""Tokenizers: GPT-2's BPE from the Hub or a local folder, or a byte-level BPE trained with `tokenizers`."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from .config import UserError, first_line

EOS = "<|endoftext|>"


def check_source(name_or_path: str, what: str, files: tuple[str, ...]) -> None:
    """One clear line for the two usual slips, before transformers answers them obscurely: a path that does
    not exist (taken for a malformed Hub id) and a folder that holds none of `files` (a run folder, data)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in files):
            hint = f"; did you mean {path / 'final'}?" if (path / "final").is_dir() else ""
            raise UserError(f"{what} '{name_or_path}' could not be loaded: the folder has none of {', '.join(files)}"
                            f"{hint}")
        return
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise UserError(f"{what} '{name_or_path}' could not be loaded: no such folder, and not a Hub id "
                        "(owner/name)") from None


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    folder = Path(name_or_path).expanduser()
    check_source(name_or_path, "tokenizer", ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    try:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() and not (
                folder / "tokenizer_config.json").is_file():
            # OpenAI's original release: just vocab.json + merges.txt, which AutoTokenizer cannot place.
            tokenizer = GPT2TokenizerFast.from_pretrained(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # offline, missing folder, 404: all one line
        raise UserError(f"tokenizer '{name_or_path}' could not be loaded: {first_line(e)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{name_or_path}' has no end-of-text token")
    return tokenizer


def train_bpe(texts, vocab_size: int, max_documents: int) -> GPT2TokenizerFast:
    """A GPT-2-style byte-level BPE learnt from `texts`, with <|endoftext|> as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(islice(texts, max_documents), trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def prepare_tokenizer(cfg, accelerator, documents) -> PreTrainedTokenizerBase:
    """The run's tokenizer, saved in `<output_dir>/tokenizer` (a resumed run reuses it, never retrains)."""
    saved = Path(cfg.output_dir) / "tokenizer"
    if cfg.tokenizer != "train":
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        if accelerator.is_main_process and not (saved / "tokenizer.json").exists():
            train_bpe(documents(), cfg.tokenizer_vocab_size, cfg.tokenizer_train_documents).save_pretrained(saved)
        accelerator.wait_for_everyone()
        tokenizer = load_tokenizer(str(saved))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(saved)
    return tokenizer
