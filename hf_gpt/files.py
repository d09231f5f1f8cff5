"""Files and folders written aside and swapped in: a crash at any moment leaves the old one or the new one
complete, never half of either. Checkpoints, final/, merged/, token shards, metrics.jsonl, summary.json and
the SFT replies are all written through here. Checkpoints and final/ carry a manifest of their files' digests,
checked before they are loaded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    """`path` replaced whole by `text`: written to `path.tmp`, then renamed over it (a rename is atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(dest: Path):
    """An empty `dest.tmp` to write into; it becomes `dest` (replace_folder) when the block ends without an
    error, and is deleted when it raises, leaving `dest` as it was."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, dest)


def replace_folder(tmp: Path, dest: Path) -> None:
    """Swap the complete folder `tmp` in as `dest`. No rename replaces a folder that holds files, so the
    old one is renamed aside and deleted only once the new one is in place: a crash at any moment
    leaves `dest` or `dest.old` complete, and recover_folders() puts the latter back."""
    old = dest.with_name(dest.name + ".old")
    recover_folder(dest)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(dest: Path) -> None:
    """Finish a swap that a crash cut short: `dest.old` comes back when `dest` is missing, else it goes."""
    old = dest.with_name(dest.name + ".old")
    if old.is_dir():
        if dest.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, dest)


def recover_folders(root: Path) -> None:
    """recover_folder() for every `*.old` folder under `root` (a run's final/, checkpoints/step_N, ...)."""
    for old in sorted(root.rglob("*.old")):
        if old.is_dir():
            recover_folder(old.with_name(old.name[:-len(".old")]))


# Written into a checkpoint or final/ last, once every other file is complete: the sha256 of each, so that a
# file damaged since (flipped bits, a truncated copy) is found before it is loaded, not trained on in silence.
MANIFEST = "manifest.json"
# The model card, which publishing rewrites in place (hf_gpt.hub): not part of what loads.
UNLISTED = (MANIFEST, "README.md")


def write_manifest(folder: Path) -> None:
    """`folder`'s MANIFEST: the size and sha256 of every file in it (and below) but UNLISTED, by relative path."""
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name not in UNLISTED):
        with path.open("rb") as f:
            files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                          "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    atomic_write(Path(folder) / MANIFEST, json.dumps({"files": files}, indent=1))


def damaged_file(folder: Path) -> str | None:
    """What is wrong with `folder` against its MANIFEST ("model.safetensors: its bytes differ from ..."), or
    None when it matches, or has no manifest (written before manifests were)."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST}: not the list of files it was written as"
    for name, expected in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name}: {path.stat().st_size:,} bytes, saved as {expected['bytes']:,} (truncated or replaced)"
        with path.open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != expected["sha256"]:
                return f"{name}: its bytes differ from those saved (sha256 in {MANIFEST})"
    return None
