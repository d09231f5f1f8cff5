"""A person's own writing, read for LoRA: every .txt/.md file of a folder (or one file) as a document, each
read whole and bounded, and the documents held out to measure the adaptation on, chosen by content."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import UserError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
# Bounds on what a run reads, so that memory stays bounded and a mistake is refused, not trained on for days.
# All .txt/.md files together: this recipe is for one person's writing, not a corpus (64 MB is ~10M words).
MAX_WRITING_BYTES = 64_000_000
# One document (a file, or a paragraph with --split_paragraphs): tokenizing one string takes ~150 times its
# size in memory (a 50 MB line took 7 GB), and held-out documents are whole ones.
MAX_DOCUMENT_CHARS = 1_000_000


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
