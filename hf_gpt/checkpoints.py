"""Checkpoints and final/: each saved whole (written aside, its manifest last, then swapped in), a checkpoint
loaded without running code from it, what a --resume must pass before anything is built (RESUMABLE), and a
disk that fills up while saving either as one error line (unwritable_as_error)."""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
from pathlib import Path

import torch
import yaml
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError

from .config import UserError, changed_fields, first_line
from .files import atomic_folder, damaged_file, replace_folder, write_manifest

CHECKPOINTS = "checkpoints"


class TiedHeadNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {'lm_head.weight'} while saving" line, written at every
    checkpoint of a model whose head is tied to its token embeddings (GPT-2's default). save_state leaves the
    alias out of model.safetensors on purpose (safetensors stores no shared tensors) and load_state loads into
    the same tied parameter, so the line says nothing; accelerate has no switch for it, only its logger's
    level, which would hide its other warnings too. Any other shared tensor is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor {'lm_head.weight'} while saving" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(TiedHeadNotice())


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def save_checkpoint(accelerator, output_dir: Path, progress: dict, batches, keep: int) -> Path:
    """Accelerate's state, and `progress` (step, tokens, ...) with the data stream's position.
    Written to step_N.tmp, then swapped in: a crash mid-save leaves the previous checkpoint intact."""
    final = output_dir / CHECKPOINTS / f"step_{progress['step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # Each process reads its own part of the stream, so each saves its own position. Plain ints, strings,
    # lists and dicts only (numpy's RNG state is a dict of ints), so it loads with weights_only=True.
    torch.save({**progress, "data": batches.state_dict()}, tmp / f"progress_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)  # last: it vouches for every file above, checked on --resume
        replace_folder(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, batches) -> dict:
    """Load a checkpoint into the prepared objects and `batches`, and return its progress, running no code
    from it: a checkpoint someone sent may hold any pickle.

    Nothing is unpickled beyond tensors, numbers, strings and containers (torch.load with weights_only=True).
    Accelerate 1.15's load_state already loads that way: the model from safetensors, optimizer.bin,
    scheduler.bin and random_states_N.pkl through accelerate.utils.load (weights_only=True, plus numpy
    arrays for the RNG states); custom_checkpoint_N.pkl, the one file it unpickles in full, it refuses
    unless objects were registered for checkpointing, and we register none. But a random-states file it
    cannot load it skips with a log line, which would leave the resumed run silently off its dropout
    stream: so that file is loaded here first, and a refusal is an error.
    """
    i = accelerator.process_index
    try:
        accelerate_load(checkpoint / f"random_states_{i}.pkl")
        progress = torch.load(checkpoint / f"progress_{i}.pt", weights_only=True)
        accelerator.load_state(str(checkpoint))
    except pickle.UnpicklingError as e:
        raise UserError(f"{checkpoint} holds a file that is more than tensors and numbers, refused as it could "
                        f"run code ({first_line(e)})") from None
    except Exception as e:  # a checkpoint from before manifests: truncated, garbled, of another model, ...
        raise UserError(f"{checkpoint} could not be loaded ({first_line(e)}); "
                        f"{without_checkpoint(checkpoint.parent.parent, checkpoint)}") from None
    batches.load_state_dict(progress.pop("data"))
    return progress


# What a resumed run may change besides output_dir and resume: its length (to extend a run; the schedule
# follows the new length from the step resumed at), what it logs, evaluates, saves and publishes, and how far
# it reads ahead (the batches served are the same).
# Anything else (data, model, optimizer, precision, seed) would load the checkpoint into another run.
RESUMABLE = ("max_steps", "max_tokens", "epochs", "log_every", "eval_every", "save_every", "keep_checkpoints",
             "report_to", "sample_prompts", "max_new_tokens", "hellaswag", "hellaswag_items", "push_to_hub",
             "stop_at_val_loss", "read_ahead")


def without_checkpoint(output_dir: Path, checkpoint: Path) -> str:
    """The way on from a damaged checkpoint: --resume takes the latest, so remove it and the one before serves."""
    earlier = [c for c in checkpoint_dirs(output_dir) if c.name < checkpoint.name]
    return f"remove it, and --resume then continues from {earlier[-1]}" if earlier else \
        "remove it, and --resume then starts from scratch"


def check_resumable(cfg, output_dir: Path, checkpoint: Path, num_processes: int) -> list[str]:
    """The changes (`field old -> new`) of RESUMABLE fields from the run's config.yaml; a checkpoint whose files
    differ from its manifest, other changes, and another number of processes (each saved its place in its own
    share of the data), are refused, and so is a run that trained GPT-2's Conv1D layers as nn.Linear (`linear_layout`,
    removed: its optimizer's moments are transposed). One started before `shuffle_rows` reads its data in order to
    the end, as it began."""
    saved_by = len(list(checkpoint.glob("progress_*.pt")))
    if saved_by == 0:
        # Every process writes one, so none means the folder was damaged (or emptied by hand) after its swap, not
        # a run of another size.
        raise UserError(f"{checkpoint} is incomplete or damaged: it holds no progress_*.pt (each process's place in "
                        f"the data); {without_checkpoint(output_dir, checkpoint)}")
    damage = damaged_file(checkpoint)
    if damage:
        raise UserError(f"{checkpoint} is damaged: {damage}; {without_checkpoint(output_dir, checkpoint)}")
    if saved_by != num_processes:
        raise UserError(f"{checkpoint} was saved by {saved_by} processes and this run has {num_processes}; "
                        f"resume with {saved_by} (each process saved its place in its own share of the data)")
    saved = output_dir / "config.yaml"
    saved = yaml.safe_load(saved.read_text()) if saved.exists() else {}
    if saved.get("linear_layout"):
        raise UserError(f"{checkpoint} holds its optimizer's state for GPT-2's layers trained as nn.Linear "
                        "(linear_layout: true), which this version no longer does (it gained under 0.5%); finish the "
                        "run with the hf-gpt that started it, or start a new one")
    if saved and "shuffle_rows" not in saved and hasattr(cfg, "shuffle_rows"):
        cfg.shuffle_rows = 0
    changes = changed_fields(saved, cfg)
    refused = [text for k, text in changes.items() if k not in RESUMABLE]
    if refused:
        raise UserError(f"{output_dir} was started with other settings (its config.yaml): {', '.join(refused)}; "
                        f"--resume may change only {', '.join(RESUMABLE)} (or start another --output_dir)")
    return list(changes.values())


def save_final(accelerator, model, tokenizer, final_dir: Path, mark=None) -> None:
    """Hub-format folder, written next to the old one and swapped in, so a failed save loses nothing;
    `mark(folder)` adds what else belongs in it before the swap."""
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards
    if accelerator.is_main_process:
        with atomic_folder(final_dir) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
            tokenizer.save_pretrained(tmp)
            if mark:
                mark(tmp)
            write_manifest(tmp)  # loading.load_causal_lm checks it
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def unwritable_as_error(what: str, folder: Path):
    """A disk that fills up while saving: one line that says what could not be written and the space left,
    not a traceback from inside torch.save or safetensors, which report it as errors of their own."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        free = shutil.disk_usage(folder).free / 2**20
        raise UserError(f"could not write {what} in {folder}: {first_line(e)} ({free:,.0f} MiB free there)") from None
