"""Files and folders written aside and swapped in: a crash at any moment leaves the old one or the new one
complete, never half of either. Checkpoints, final/, merged/, token shards, metrics.jsonl, summary.json and
the SFT replies are all written through here."""

from __future__ import annotations

import contextlib
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
