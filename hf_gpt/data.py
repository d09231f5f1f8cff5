"""Pretraining data: streamed documents -> tokens -> packed blocks with per-document positions.

Every source is a `datasets.IterableDataset` read lazily (a Hub id, local text/JSONL/Parquet files, or
the Python standard library's own source as an offline corpus), so nothing is held in RAM and the
stream's position can be checkpointed with `IterableDataset.state_dict()`.

Each document becomes ``[EOS] + tokens``: the leading EOS is GPT-2's ``<|endoftext|>`` separator, so
the last token of one document learns to predict the end of text, and the first real token of
the next is predicted from a fresh start. Position ids restart at 0 at every document (and at every
block), and hf_gpt.model turns them into a block-diagonal causal mask: attention never crosses a
document boundary.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import torch
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from .config import UserError

STDLIB = "stdlib"
LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".py": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# Left out of the stdlib corpus: third-party packages, and the test suites and codec tables, which are
# two thirds of the bytes but mostly hex dumps, byte strings and "0x00e -> LATIN SMALL LETTER T"
# lines that a small model learns to repeat instead of Python.
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings"}


def stdlib_files(seed: int = 0) -> list[str]:
    """The Python standard library's .py files: real text nobody here wrote, on every machine.

    Shuffled once with a fixed seed so training does not walk the tree package by package.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in root.rglob("*.py") if not STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))
    random.Random(seed).shuffle(files)
    return files


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).suffix in LOCAL_BUILDERS or Path(name).exists()


def _local_files(name: str) -> tuple[str, list[str]]:
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"dataset path not found: {name}")
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [str(path)]
    files = [f for f in files if Path(f).suffix in LOCAL_BUILDERS]
    if not files:
        raise UserError(f"dataset {name}: no .txt/.md/.json/.jsonl/.parquet files in it")
    builders = {LOCAL_BUILDERS[Path(f).suffix] for f in files}
    if len(builders) > 1:
        raise UserError(f"dataset {name}: mixes file kinds ({', '.join(sorted(builders))}); use one kind")
    return builders.pop(), files


def _first_undecodable(files: list[str], encoding: str = "utf-8") -> str:
    for f in files:
        try:
            Path(f).read_bytes().decode(encoding)
        except UnicodeDecodeError as e:
            return f"{f} (byte {e.start})"
    return "one of the files"


class DocumentSource:
    """Where documents come from, resolved once: the builder, its files or Hub id, and the text column."""

    def __init__(self, name: str, *, config: str = "", split: str = "train", text_column: str = "text",
                 encoding_errors: str = "strict", seed: int = 0):
        self.name, self.split, self.text_column = name, split, text_column
        self.files: list[str] = []
        if name == STDLIB:
            # CPython ships a few deliberately non-UTF-8 test files; replace their odd bytes.
            self.files = stdlib_files(seed)
            self.args = ("text",)
            self.kwargs = dict(data_files=self.files, sample_by="document", encoding_errors="replace")
        elif _looks_local(name):
            builder, self.files = _local_files(name)
            self.args = (builder,)
            self.kwargs = dict(data_files=self.files)
            if builder == "text":
                self.kwargs.update(sample_by="document", encoding_errors=encoding_errors)
        else:
            self.args = (name, config or None)
            self.kwargs = {}

    def load(self, split: str | None = None) -> IterableDataset:
        split = split or self.split
        if self.files:
            split = "train"  # local files form a single split; validation is held out by hash
        try:
            return load_dataset(*self.args, split=split, streaming=True, **self.kwargs)
        except Exception as e:  # the Hub raises many kinds (offline, 404, gated, no split): one line each
            where = f"from the Hub (split {split})" if not self.files else "from local files"
            raise UserError(f"dataset '{self.name}' could not be loaded {where}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None

    def describe_error(self, error: Exception) -> UserError:
        if isinstance(error, UnicodeDecodeError):
            return UserError(f"dataset {self.name}: undecodable bytes in {_first_undecodable(self.files)}; "
                             "fix the file or set data_encoding_errors: replace")
        return UserError(f"dataset {self.name}: {type(error).__name__}: {error}")


def in_holdout(text: str, fraction: float) -> bool:
    """Deterministic document-level split: the same document is held out in every run and on every process."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def tokenized_documents(source: DocumentSource, tokenizer, *, holdout: float, validation: bool,
                        split: str | None = None, process_index: int = 0, num_processes: int = 1) -> IterableDataset:
    """A stream of ``{"input_ids": [EOS, ...tokens]}``, one per non-empty document.

    With several processes every process reads a different part (whole shards where the count
    divides, else every n-th document), so no document is seen twice in one pass.
    """
    ds = source.load(split)
    if num_processes > 1:
        ds = split_dataset_by_node(ds, rank=process_index, world_size=num_processes)
    column, eos = source.text_column, tokenizer.eos_token_id

    def keep(batch):
        try:
            texts = batch[column]
        except KeyError:
            raise UserError(f"dataset {source.name} has no column '{column}' (it has: {', '.join(batch)}); "
                            "set text_column") from None
        return [bool(t and t.strip()) and (holdout <= 0 or in_holdout(t, holdout) == validation) for t in texts]

    def tokenize(batch):
        ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[eos] + x for x in ids]}

    ds = ds.filter(keep, batched=True, batch_size=256)
    return ds.map(tokenize, batched=True, batch_size=256, remove_columns=list(ds.column_names or [column]))


class PackedBatches:
    """Packs a document stream into (micro_batch_size, block_size) batches; checkpointable.

    crop: ""       long documents flow on into the next block (nothing is dropped);
          "random" one window of block_size tokens at a random offset per long document;
          "start"  the first block_size tokens of each document (what the seed article did).
    document_masking=False restores plain concatenation: no position_ids, so the model counts 0..T-1
    and attends across documents.
    The state (stream position, epoch, unfinished block, crop RNG) makes a resumed run read exactly
    the tokens an uninterrupted one would.
    """

    def __init__(self, documents: IterableDataset, *, block_size: int, micro_batch_size: int, crop: str = "",
                 document_masking: bool = True, seed: int = 0, error_context: DocumentSource | None = None):
        if crop not in ("", "random", "start"):
            raise UserError(f"crop must be '', 'random' or 'start', not '{crop}'")
        self.documents, self.block_size, self.micro_batch_size = documents, block_size, micro_batch_size
        self.crop, self.document_masking, self.source = crop, document_masking, error_context
        self.epoch, self.rng = 0, np.random.default_rng(seed)
        self.tokens, self.positions = np.empty(0, np.int64), np.empty(0, np.int64)
        self._iter = None
        self._epoch_docs = 0

    def _next_document(self) -> np.ndarray:
        while True:
            if self._iter is None:
                self.documents.set_epoch(self.epoch)
                self._iter = iter(self.documents)
            try:
                doc = np.asarray(next(self._iter)["input_ids"], dtype=np.int64)
                self._epoch_docs += 1
                return doc
            except StopIteration:
                if self._epoch_docs == 0:
                    name = self.source.name if self.source else "the dataset"
                    raise UserError(f"dataset {name}: no documents to train on (empty corpus"
                                    + (" on this process" if self.source else "") + ")") from None
                self.epoch, self._iter, self._epoch_docs = self.epoch + 1, None, 0
            except UserError:
                raise
            except Exception as e:
                if self.source is None:
                    raise
                raise self.source.describe_error(e) from None

    def _crop(self, doc: np.ndarray) -> np.ndarray:
        if len(doc) <= self.block_size or not self.crop:
            return doc
        start = int(self.rng.integers(0, len(doc) - self.block_size + 1)) if self.crop == "random" else 0
        return doc[start:start + self.block_size]

    def _fill(self, n: int) -> None:
        while len(self.tokens) < n:
            doc = self._crop(self._next_document())
            pos = np.arange(len(doc), dtype=np.int64)
            self.tokens = np.concatenate([self.tokens, doc])
            self.positions = np.concatenate([self.positions, pos])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        n = self.micro_batch_size * self.block_size
        self._fill(n)
        tokens, self.tokens = self.tokens[:n], self.tokens[n:]
        positions, self.positions = self.positions[:n], self.positions[n:]
        input_ids = torch.from_numpy(tokens.copy()).view(self.micro_batch_size, self.block_size)
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if self.document_masking:
            # A document cut by a block boundary starts again at position 0 in the next row.
            pos = torch.from_numpy(positions.copy()).view(self.micro_batch_size, self.block_size)
            batch["position_ids"] = pos - _carry_offset(pos)
        return batch

    def state_dict(self) -> dict:
        return {"documents": self.documents.state_dict(), "epoch": self.epoch, "epoch_docs": self._epoch_docs,
                "tokens": self.tokens.tolist(), "positions": self.positions.tolist(),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._epoch_docs = state["epoch"], state["epoch_docs"]
        self.documents.set_epoch(self.epoch)
        self.documents.load_state_dict(state["documents"])
        self._iter = None
        self.tokens = np.asarray(state["tokens"], dtype=np.int64)
        self.positions = np.asarray(state["positions"], dtype=np.int64)
        self.rng.bit_generator.state = state["rng"]


def _carry_offset(pos: torch.Tensor) -> torch.Tensor:
    """Per row, the amount to subtract so that a document carried over from the previous row or block
    (the run before the row's first 0) restarts at position 0 too."""
    started = (pos == 0).cumsum(dim=1) > 0
    return torch.where(started, torch.zeros_like(pos), pos[:, :1].expand_as(pos))


class PretrainData:
    """The pretraining recipe's data for the engine: packed training blocks and a fixed validation set."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.shards = TokenShards(cfg.dataset) if TokenShards.is_shard_folder(cfg.dataset) else None
        self.source = None if self.shards else DocumentSource(
            cfg.dataset, config=cfg.dataset_config, split=cfg.dataset_split, text_column=cfg.text_column,
            encoding_errors=cfg.data_encoding_errors, seed=cfg.seed)

    def _documents(self, validation: bool, process_index: int = 0, num_processes: int = 1):
        split = self.cfg.eval_split if validation and self.cfg.eval_split else None
        holdout = 0.0 if self.cfg.eval_split else self.cfg.holdout_fraction
        return tokenized_documents(self.source, self.tokenizer, holdout=holdout, validation=validation,
                                   split=split, process_index=process_index, num_processes=num_processes)

    def _batches(self, documents, seed: int) -> PackedBatches:
        cfg = self.cfg
        return PackedBatches(documents, block_size=cfg.block_size, micro_batch_size=cfg.micro_batch_size,
                             crop=cfg.crop, document_masking=cfg.document_masking, seed=seed,
                             error_context=self.source)

    def _shard_batches(self, split: str, process_index: int, num_processes: int) -> ShardBatches:
        cfg = self.cfg
        return ShardBatches(self.shards.tokens(split), eos=self.tokenizer.eos_token_id, block_size=cfg.block_size,
                            micro_batch_size=cfg.micro_batch_size, document_masking=cfg.document_masking,
                            process_index=process_index, num_processes=num_processes)

    def train_batches(self, process_index: int, num_processes: int):
        if self.shards:
            return self._shard_batches("train", process_index, num_processes)
        return self._batches(self._documents(False, process_index, num_processes), self.cfg.seed + process_index)

    def eval_batches(self, process_index: int, num_processes: int) -> list[dict]:
        """The first eval_batches x processes blocks of held-out text, the same in every run; each process
        takes its share. Crop is off: validation measures whole documents."""
        cfg = self.cfg
        if self.shards:
            batches = self._shard_batches("validation", 0, 1)
        else:
            batches = PackedBatches(self._documents(True), block_size=cfg.block_size,
                                    micro_batch_size=cfg.micro_batch_size, document_masking=cfg.document_masking,
                                    error_context=self.source)
        wanted = cfg.eval_batches * num_processes
        return [batch for i, batch in zip(range(wanted), batches) if i % num_processes == process_index]

    def texts(self):
        """Training documents as text, for training the tokenizer (never the held-out ones)."""
        ds = self.source.load()
        column, frac = self.cfg.text_column, self.cfg.holdout_fraction
        return (ex[column] for ex in ds if ex[column].strip() and not in_holdout(ex[column], frac))


class TokenShards:
    """Pre-tokenized documents in flat binary files (scripts/prepare_data.py), read through np.memmap.

    A folder holds `meta.json` and `{split}_NNNN.bin` files of uint16/uint32 tokens, every document
    starting with EOS, so document positions can be recovered from the tokens alone.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_file = self.folder / "meta.json"
        if not meta_file.exists():
            raise UserError(f"{folder}: no meta.json (make the folder with scripts/prepare_data.py)")
        self.meta = json.loads(meta_file.read_text())

    @staticmethod
    def is_shard_folder(name: str) -> bool:
        return (Path(name).expanduser() / "meta.json").is_file()

    def tokens(self, split: str) -> np.ndarray:
        """All shards of a split as one array (memory-mapped: nothing is read until used)."""
        files = [self.folder / s["file"] for s in self.meta["shards"] if s["split"] == split]
        if not files:
            raise UserError(f"{self.folder}: no '{split}' shards")
        arrays = [np.memmap(f, dtype=self.meta["dtype"], mode="r") for f in files]
        return arrays[0] if len(arrays) == 1 else _Concatenated(arrays)


class _Concatenated:
    """Slices across several memmaps as if they were one array."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, s: slice) -> np.ndarray:
        out, start, stop = [], s.start, s.stop
        for a, lo, hi in zip(self.arrays, self.starts[:-1], self.starts[1:]):
            if start < hi and stop > lo:
                out.append(a[max(start, lo) - lo:min(stop, hi) - lo])
        return np.concatenate(out)


class ShardBatches:
    """Blocks read in order from a contiguous 1/num_processes slice of the token shards; checkpointable.

    Positions restart at every EOS (a document start) and at every row, as in PackedBatches.
    """

    def __init__(self, tokens, *, eos: int, block_size: int, micro_batch_size: int, document_masking: bool = True,
                 process_index: int = 0, num_processes: int = 1):
        share = len(tokens) // num_processes
        self.tokens, self.lo, self.hi = tokens, process_index * share, (process_index + 1) * share
        self.eos, self.block_size, self.micro_batch_size = eos, block_size, micro_batch_size
        self.document_masking = document_masking
        self.offset, self.epoch = self.lo, 0
        if share < block_size * micro_batch_size:
            raise UserError(f"token shards too small: {share} tokens per process, a batch needs "
                            f"{block_size * micro_batch_size}")

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        n = self.block_size * self.micro_batch_size
        if self.offset + n > self.hi:
            self.offset, self.epoch = self.lo, self.epoch + 1
        chunk = np.asarray(self.tokens[self.offset:self.offset + n], dtype=np.int64)
        self.offset += n
        input_ids = torch.from_numpy(chunk).view(self.micro_batch_size, self.block_size)
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if self.document_masking:
            batch["position_ids"] = positions_from_eos(input_ids, self.eos)
        return batch

    def state_dict(self) -> dict:
        return {"offset": self.offset, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.offset, self.epoch = state["offset"], state["epoch"]


def positions_from_eos(input_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Every EOS opens a document at position 0; a row's first tokens continue one from before, also at 0."""
    idx = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    starts = torch.where(input_ids == eos, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - starts


def write_token_shards(source: DocumentSource, tokenizer, out: Path, *, holdout: float, shard_tokens: int,
                       max_documents: int = 0, progress=None) -> dict:
    """Tokenize a document source once into TokenShards (train and validation by the same hash split).

    Written to `<out>.tmp` and renamed at the end, so an interrupted run never leaves a half folder.
    """
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, validation in (("train", False), ("validation", True)):
        documents = tokenized_documents(source, tokenizer, holdout=holdout, validation=validation)
        pending, count, docs = [], 0, 0

        def flush():
            nonlocal pending, count
            if count:
                name = f"{split}_{len([s for s in shards if s['split'] == split]):04d}.bin"
                np.concatenate(pending).astype(dtype).tofile(tmp / name)
                shards.append({"file": name, "split": split, "tokens": count})
                pending, count = [], 0

        for row in documents:
            ids = np.asarray(row["input_ids"], dtype=np.int64)
            pending.append(ids)
            count += len(ids)
            docs += 1
            if progress:
                progress(split, len(ids))
            if count >= shard_tokens:
                flush()
            if max_documents and docs >= max_documents:
                break
        flush()
    meta = {"dtype": np.dtype(dtype).name, "eos_token_id": tokenizer.eos_token_id, "dataset": source.name,
            "holdout_fraction": holdout, "shards": shards}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    tokenizer.save_pretrained(tmp / "tokenizer")
    if out.exists():
        raise UserError(f"{out} already exists; remove it or choose another --out")
    tmp.rename(out)
    return meta
