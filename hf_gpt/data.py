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
import itertools
import json
import random
import sysconfig
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from datasets import IterableDataset, interleave_datasets, load_dataset
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
from datasets.distributed import split_dataset_by_node

from .config import UserError, check_choice, could_not_load, dataset_names, first_line
from .files import atomic_folder
from .writing import MAX_DOCUMENT_CHARS

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


def _local_files(name: str) -> tuple[str, dict[str, list[str]]]:
    """The builder and the files of each split of a local file or folder.

    A folder whose file names say their split (`train-0000.parquet`, `validation.parquet`, `test.txt`)
    is split as `load_dataset(folder)` would split it, by `datasets`' own name patterns; any other
    folder is one `train` split.
    """
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"dataset path not found: {name}")
    if path.is_dir():
        try:
            found = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
        except EmptyDatasetError:
            found = {}
        splits = {str(split): sorted(f for f in files if Path(f).suffix in LOCAL_BUILDERS and
                                     not Path(f).name.startswith("."))
                  for split, files in found.items()}
    else:
        splits = {"train": [str(path)] if path.suffix in LOCAL_BUILDERS else []}
    splits = {split: files for split, files in splits.items() if files}
    if not splits:
        raise UserError(f"dataset {name}: no .txt/.md/.json/.jsonl/.parquet files in it")
    builders = {LOCAL_BUILDERS[Path(f).suffix] for files in splits.values() for f in files}
    if len(builders) > 1:
        raise UserError(f"dataset {name}: mixes file kinds ({', '.join(sorted(builders))}); use one kind")
    return builders.pop(), splits


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
        self.splits: dict[str, list[str]] = {}  # local files by split; empty for a Hub dataset
        if name == STDLIB:
            # CPython ships a few deliberately non-UTF-8 test files; replace their odd bytes.
            self.splits = {"train": stdlib_files(seed)}
            self.args = ("text",)
            self.kwargs = dict(sample_by="document", encoding_errors="replace")
        elif _looks_local(name):
            builder, self.splits = _local_files(name)
            self.args = (builder,)
            self.kwargs = dict(sample_by="document", encoding_errors=encoding_errors) if builder == "text" else {}
        else:
            self.args = (name, config or None)
            self.kwargs = {}

    @property
    def files(self) -> list[str]:
        return [f for files in self.splits.values() for f in files]

    def has_split(self, split: str) -> bool:
        """Only asked of local files: a Hub dataset's splits are known once it is loaded."""
        return split in self.splits

    def load(self, split: str | None = None) -> IterableDataset:
        split = split or self.split
        kwargs = self.kwargs
        if self.splits:
            if split not in self.splits:
                raise UserError(f"dataset {self.name} has no '{split}' split (it has: {', '.join(self.splits)})")
            kwargs = {**kwargs, "data_files": {split: self.splits[split]}}
        where = f" from the Hub (split {split})" if not self.files else " from local files"
        with could_not_load("dataset", self.name, where):
            return load_dataset(*self.args, split=split, streaming=True, **kwargs)

    def describe_error(self, error: Exception) -> UserError:
        if isinstance(error, UnicodeDecodeError):
            return UserError(f"dataset {self.name}: undecodable bytes in {_first_undecodable(self.files)}; "
                             "fix the file or set data_encoding_errors: replace")
        return UserError(f"dataset {self.name}: {first_line(error)}")


def bounded(text: str, source: DocumentSource) -> str:
    """`text`, unless it is longer than a document may be (MAX_DOCUMENT_CHARS, as for LoRA's writing): tokenizing
    one string takes ~150 times its size in memory, so a 30 MB one-line file took 4.9 GB."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise UserError(f"dataset {source.name}: a document of {len(text):,} characters (starting "
                        f"{text[:40]!r}), longer than the {MAX_DOCUMENT_CHARS:,} a document may have; split it into "
                        "several (a text file is one document, a JSON Lines record one)")
    return text


class Mixture:
    """Several sources read as one stream (`dataset: a, b` with `dataset_weights`): each next document comes from
    source i with probability weights[i], by datasets.interleave_datasets, seeded, so that every run draws alike and
    its state_dict() resumes the draw exactly. Each source keeps its own hold-out (its validation split, or its
    documents held out by hash), and the validation set is every source's validation documents once, mixed by
    the same weights, so that a run's first eval_batches measure the mixture it trains on."""

    def __init__(self, sources: list[DocumentSource], weights: list[float], *, seed: int, stopping_strategy: str):
        weights = weights or [1.0] * len(sources)
        self.sources, self.weights = sources, [w / sum(weights) for w in weights]
        self.seed, self.stopping_strategy = seed, stopping_strategy
        self.name = ", ".join(s.name for s in sources)

    @property
    def files(self) -> list[str]:
        return [f for s in self.sources for f in s.files]

    describe_error = DocumentSource.describe_error

    def mix(self, streams: list[IterableDataset], validation: bool = False, process_index: int = 0,
            num_processes: int = 1) -> IterableDataset:
        """The sources' streams (each whole, not split between processes) as one, and this process's share of it:
        every process draws the same sequence and keeps its own part (whole shards where their count divides, else
        every n-th document), so that together they read what one process would."""
        strategy = "all_exhausted_without_replacement" if validation else self.stopping_strategy
        ds = interleave_datasets(streams, probabilities=self.weights, seed=self.seed, stopping_strategy=strategy)
        return split_dataset_by_node(ds, rank=process_index, world_size=num_processes) if num_processes > 1 else ds


def document_digest(text: str) -> int:
    """A document's 64-bit fingerprint: the same in every run and on every process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")


def in_holdout(text: str, fraction: float) -> bool:
    """Deterministic document-level split: the same document is held out in every run and on every process."""
    return document_digest(text) < fraction * 2**64


def head_digests(source: DocumentSource, count: int) -> frozenset[int]:
    """The fingerprints of the stream's first `count` documents (validation held out from the head).

    Training leaves them out by fingerprint, not with `IterableDataset.skip`: a skip placed before the
    files are shuffled stops `datasets` shuffling them, and under `split_dataset_by_node` it skips the
    first count / shards documents of every shard rather than the head. A fingerprint leaves the head out
    of every process's share in any order, and a copy of a held-out document elsewhere in the corpus too.
    """
    column = source.text_column
    try:
        return frozenset(document_digest(ex[column]) for ex in source.load().take(count) if ex.get(column))
    except UserError:
        raise
    except Exception as e:
        raise source.describe_error(e) from None


def tokenized_documents(source: DocumentSource, tokenizer, *, holdout: float, validation: bool,
                        split: str | None = None, process_index: int = 0, num_processes: int = 1,
                        shuffle_seed: int | None = None, head: int = 0,
                        held_out: frozenset[int] = frozenset()) -> IterableDataset:
    """A stream of ``{"input_ids": [EOS, ...tokens]}``, one per non-empty document.

    With several processes every process reads a different part (whole shards where the count
    divides, else every n-th document), so no document is seen twice in one pass.
    shuffle_seed: the shards (files) in a new order every epoch (set_epoch), several read interleaved, by
    `datasets`' own shuffle. Its buffer of documents is left at one: `state_dict()` does not save that
    buffer, so a resumed run would skip the documents in it. Documents are mixed after packing instead, by
    PackedBatches' buffer of rows, which a checkpoint saves.
    head: validation is the stream's first `head` documents, and training leaves out the documents whose
    fingerprints are `held_out` (head_digests) in place of the hash hold-out.
    """
    ds = source.load(split)
    if head and validation:
        ds = ds.take(head)
    if shuffle_seed is not None:  # before the split: every process shuffles alike, then takes its own shards
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=1)
    if num_processes > 1:
        ds = split_dataset_by_node(ds, rank=process_index, world_size=num_processes)
    column, eos = source.text_column, tokenizer.eos_token_id

    def keep(batch):
        try:
            texts = batch[column]
        except KeyError:
            raise UserError(f"dataset {source.name} has no column '{column}' (it has: {', '.join(batch)}); "
                            "set text_column") from None
        if head:
            return [bool(t and bounded(t, source).strip()) and (validation or document_digest(t) not in held_out)
                    for t in texts]
        return [bool(t and bounded(t, source).strip()) and (holdout <= 0 or in_holdout(t, holdout) == validation)
                for t in texts]

    def tokenize(batch):
        ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[eos] + x for x in ids]}

    # 256 documents a batch. Read in the training loop's thread (read_ahead 0), a batch of books (~1.2M tokens)
    # stalls the GPU ~0.5 s every 17 steps of english-124m.yaml; 16 at a time cost more than they hid (the seed
    # recipe 227k -> 127k tokens/s, Muon 421k -> 328k; one H200, 2026-12-03). read_ahead moves the reading to a
    # thread of its own instead (docs/results/time-to-quality.md).
    ds = ds.filter(keep, batched=True, batch_size=256)
    return ds.map(tokenize, batched=True, batch_size=256, remove_columns=list(ds.column_names or [column]))


class PackedBatches:
    """Packs a document stream into rows of block_size tokens and serves them as micro-batches; checkpointable.

    shuffle_rows: rows held in a buffer from which every micro-batch is drawn at random (0: rows in stream
    order). A long document fills several consecutive rows, and served in order they would make up much of
    one micro-batch (a 4,000-token chapter is four rows of 1024): a batch of a few documents' consecutive
    pieces teaches far less than one of as many documents as rows (docs/results/mixing.md). The buffer is
    drawn down to its last micro-batch before the next epoch is read, so an epoch stays one pass over the
    data (LoRA's epochs of a few hundred rows are not mixed together) and every epoch is drawn in a new order.

    crop: ""       long documents flow on into the next row (nothing is dropped);
          "random" one window of block_size tokens at a random offset per long document;
          "start"  the first block_size tokens of each document (what the seed article did).
    document_masking=False restores plain concatenation: no position_ids, so the model counts 0..T-1
    and attends across documents.
    The state (stream position, epoch, the buffer's rows, the unfinished row, the RNG) makes a resumed run
    read exactly the tokens an uninterrupted one would.
    one_pass=True (validation) reads the stream once, in order, and then stops, its last row padded.
    no_loss: a token id that is given but never a target (LoRA's trigger).
    """

    def __init__(self, documents: IterableDataset, *, block_size: int, micro_batch_size: int, crop: str = "",
                 document_masking: bool = True, shuffle_rows: int = 0, seed: int = 0,
                 error_context: DocumentSource | None = None, one_pass: bool = False, no_loss: int | None = None):
        check_choice("crop", crop)
        self.documents, self.block_size, self.micro_batch_size = documents, block_size, micro_batch_size
        self.crop, self.document_masking, self.source = crop, document_masking, error_context
        self.one_pass, self.no_loss = one_pass, no_loss
        self.shuffle = shuffle_rows > 0 and not one_pass
        self.capacity = max(shuffle_rows, micro_batch_size) if self.shuffle else micro_batch_size
        self.epoch, self.rng = 0, np.random.default_rng(seed)
        self._rows: list[np.ndarray] = []  # each (2, block_size): tokens (-1 = padding) and positions
        self._tail = np.empty((2, 0), np.int64)  # the unfinished row
        self._iter = None
        self._epoch_docs, self._epoch_read = 0, False

    def _next_document(self) -> np.ndarray | None:
        """The next document's tokens; None at the end of the epoch."""
        if self._iter is None:
            self.documents.set_epoch(self.epoch)
            self._iter = iter(self.documents)
        try:
            doc = np.asarray(next(self._iter)["input_ids"], dtype=np.int64)
        except StopIteration:
            if self._epoch_docs == 0 and not self.one_pass:
                name = self.source.name if self.source else "the dataset"
                raise UserError(f"dataset {name}: no documents to train on (empty corpus"
                                + (" on this process" if self.source else "") + ")") from None
            self._epoch_read = True
            return None
        except UserError:
            raise
        except Exception as e:
            if self.source is None:
                raise
            raise self.source.describe_error(e) from None
        self._epoch_docs += 1
        return doc

    def _crop(self, doc: np.ndarray) -> np.ndarray:
        if len(doc) <= self.block_size or not self.crop:
            return doc
        start = int(self.rng.integers(0, len(doc) - self.block_size + 1)) if self.crop == "random" else 0
        return doc[start:start + self.block_size]

    def _fill(self) -> None:
        """Read documents until the buffer is full. At the end of an epoch, the next is begun only once fewer
        rows than a micro-batch are left; in one-pass mode the unfinished row is padded and reading ends."""
        while len(self._rows) < self.capacity:
            if self._epoch_read:
                if self.one_pass:
                    if self._tail.shape[1]:
                        self._add(self._tail, pad=True)
                    return
                if len(self._rows) >= self.micro_batch_size:
                    return
                self.epoch, self._iter, self._epoch_docs, self._epoch_read = self.epoch + 1, None, 0, False
            doc = self._next_document()
            if doc is not None:
                doc = self._crop(doc)
                self._add(np.concatenate([self._tail, np.stack([doc, np.arange(len(doc))])], axis=1))

    def _add(self, tokens: np.ndarray, pad: bool = False) -> None:
        """Cut (2, n) tokens and positions into rows for the buffer; the rest, shorter than a row, is the tail
        (with pad, one last row filled out with padding)."""
        size = self.block_size
        if pad:
            tokens = np.concatenate([tokens, np.tile([[-1], [0]], -tokens.shape[1] % size)], axis=1)
        full = tokens.shape[1] // size * size
        rows = tokens[:, :full].reshape(2, -1, size).transpose(1, 0, 2).copy()
        # A document cut by a row boundary starts again at position 0 in the next row.
        rows[:, 1] = _restart_rows(rows[:, 1])
        self._rows.extend(rows)
        self._tail = tokens[:, full:].copy()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self._fill()
        n = min(self.micro_batch_size, len(self._rows))
        if not n:
            raise StopIteration
        if self.shuffle:
            picks = self.rng.choice(len(self._rows), n, replace=False)
            rows = np.stack([self._rows[i] for i in picks])
            for i in sorted(picks, reverse=True):  # the last row fills the hole: none of the picks is behind i
                last = self._rows.pop()
                if i < len(self._rows):
                    self._rows[i] = last
        else:
            rows = np.stack(self._rows[:n])
            del self._rows[:n]
        batch = token_batch(rows[:, 0], self.no_loss)
        if self.document_masking:
            batch["position_ids"] = torch.from_numpy(np.ascontiguousarray(rows[:, 1]))
        return batch

    def state_dict(self) -> dict:
        rows = np.stack(self._rows) if self._rows else np.empty((0, 2, self.block_size), np.int64)
        # Tensors, which a checkpoint stores compactly and loads with weights_only=True (a buffer of 2048
        # rows of 1024 is 16 MB in int32).
        return {"documents": self.documents.state_dict(), "epoch": self.epoch, "epoch_docs": self._epoch_docs,
                "epoch_read": self._epoch_read, "rows": torch.from_numpy(rows.astype(np.int32)),
                "tail": torch.from_numpy(self._tail.astype(np.int32)), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._epoch_docs = state["epoch"], state["epoch_docs"]
        self.documents.set_epoch(self.epoch)
        self.documents.load_state_dict(state["documents"])
        self._iter = None
        self.rng.bit_generator.state = state["rng"]
        if "rows" in state:
            self._epoch_read = state["epoch_read"]
            self._rows = list(state["rows"].numpy().astype(np.int64))
            self._tail = state["tail"].numpy().astype(np.int64)
        else:  # a checkpoint from before the buffer: the stream's unfinished tokens, cut into rows as before
            self._epoch_read, self._rows, self._tail = False, [], np.empty((2, 0), np.int64)
            self._add(np.asarray([state["tokens"], state["positions"]], dtype=np.int64).reshape(2, -1))


def process_share(batches: Iterable[dict], process_index: int, num_processes: int, eval_batches: int = 0) -> list[dict]:
    """This process's share of a fixed set of batches (validation): eval_batches of them per process, of
    the first eval_batches x num_processes (all when 0). Every process gets as many, the set topped up with
    copies that carry no targets: sharded models (FSDP) run each forward on all processes."""
    batches = list(itertools.islice(batches, eval_batches * num_processes or None))
    while batches and len(batches) % num_processes:
        batches.append({**batches[-1], "labels": torch.full_like(batches[-1]["labels"], -100)})
    return batches[process_index::num_processes]


def as_rows(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """Flat tokens in rows of block_size, the last filled out with padding (-1)."""
    rows = np.full(-(-len(tokens) // block_size) * block_size, -1, dtype=np.int64)
    rows[:len(tokens)] = tokens
    return rows.reshape(-1, block_size)


def token_batch(rows: np.ndarray, no_loss: int | None = None) -> dict[str, torch.Tensor]:
    """`input_ids` and `labels` of rows of token ids; padding (-1, given as id 0), and the token `no_loss`,
    carry no loss."""
    input_ids = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    labels = input_ids.clone()
    labels[input_ids < 0] = -100
    if no_loss is not None:
        labels[input_ids == no_loss] = -100
    return {"input_ids": input_ids.clamp(min=0), "labels": labels}


def _restart_rows(positions: np.ndarray) -> np.ndarray:
    """Per row, a document carried over from the previous row (the run before the row's first 0) restarted
    at position 0 too."""
    started = np.cumsum(positions == 0, axis=1) > 0
    return np.where(started, positions, positions - positions[:, :1])


class PretrainData:
    """The pretraining recipe's data for the engine: packed training blocks and a fixed validation set."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.shards = TokenShards(cfg.dataset) if TokenShards.is_shard_folder(cfg.dataset) else None
        # Token shards are tokenized already: the tokenizer they were made with is the one that reads them.
        self.tokenizer_name = (str(self.shards.folder / "tokenizer") if self.shards and cfg.tokenizer == "train"
                               else cfg.tokenizer)
        names = dataset_names(cfg.dataset)
        if len(names) > 1 and any(TokenShards.is_shard_folder(n) for n in names):
            raise UserError(f"dataset {cfg.dataset}: token shards cannot be mixed; mix the sources' documents instead "
                            "(name them in dataset)")
        self.sources = [] if self.shards else [DocumentSource(
            name, config=cfg.dataset_config, split=cfg.dataset_split, text_column=cfg.text_column,
            encoding_errors=cfg.data_encoding_errors, seed=cfg.seed) for name in names]
        self.mixture = Mixture(self.sources, cfg.dataset_weights, seed=cfg.seed,
                               stopping_strategy=cfg.stopping_strategy) if len(self.sources) > 1 else None
        self.source = self.mixture or (self.sources[0] if self.sources else None)  # what errors name
        # Validation, per source: the named split; else the stream's first val_documents (one source); else a
        # local folder's own validation files; else documents held out by hash.
        self.head = getattr(cfg, "val_documents", 0) if self.sources else 0
        if self.head and cfg.eval_split:
            raise UserError(f"set eval_split ({cfg.eval_split}) or val_documents ({self.head}), not both")
        if self.head and self.mixture:
            raise UserError(f"val_documents holds out the head of one stream, and dataset {cfg.dataset} mixes "
                            f"{len(self.sources)}: set val_documents 0 (each source then validates on its own split "
                            "or hash hold-out)")
        self.eval_splits = [cfg.eval_split or ("validation" if not self.head and s.has_split("validation") else "")
                            for s in self.sources]
        self.holdouts = [0.0 if split or self.head else cfg.val_fraction for split in self.eval_splits]
        self.eval_split, self.holdout = (self.eval_splits[0], self.holdouts[0]) if self.sources else ("", 0.0)
        self._held_out: frozenset[int] | None = None

    @property
    def held_out(self) -> frozenset[int]:
        """The fingerprints of the head's documents, read once (val_documents; empty without it)."""
        if self._held_out is None:
            self._held_out = head_digests(self.sources[0], self.head) if self.head else frozenset()
        return self._held_out

    def _documents(self, validation: bool, process_index: int = 0, num_processes: int = 1):
        shuffle = self.cfg.shuffle_rows > 0 and not validation
        own = self.mixture is None  # a mixture is split between processes once mixed (Mixture.mix)
        held_out = self.held_out if self.head and not validation else frozenset()
        streams = [tokenized_documents(source, self.tokenizer, holdout=holdout, validation=validation,
                                       split=split if validation and split else None,
                                       process_index=process_index if own else 0,
                                       num_processes=num_processes if own else 1,
                                       shuffle_seed=self.cfg.seed if shuffle else None, head=self.head,
                                       held_out=held_out)
                   for source, split, holdout in zip(self.sources, self.eval_splits, self.holdouts)]
        return self.mixture.mix(streams, validation, process_index, num_processes) if self.mixture else streams[0]

    def train_batches(self, process_index: int, num_processes: int):
        cfg = self.cfg
        if self.shards:
            self.shards.check_tokenizer(self.tokenizer, self.tokenizer_name)
            return ShardBatches(self.shards.tokens("train"), eos=self.tokenizer.eos_token_id,
                                block_size=cfg.block_size, micro_batch_size=cfg.micro_batch_size,
                                document_masking=cfg.document_masking, shuffle=cfg.shuffle_rows > 0,
                                seed=cfg.seed, process_index=process_index, num_processes=num_processes)
        return PackedBatches(self._documents(False, process_index, num_processes), block_size=cfg.block_size,
                             micro_batch_size=cfg.micro_batch_size, crop=cfg.crop,
                             document_masking=cfg.document_masking, shuffle_rows=cfg.shuffle_rows,
                             seed=cfg.seed + process_index, error_context=self.source)

    def eval_batches(self, process_index: int, num_processes: int) -> list[dict]:
        """This process's share of the validation set: one pass over the validation split (or its first
        eval_batches micro-batches per process), the same in every run.

        Whatever the training's crop and masking, validation reads whole documents that each attend only
        to themselves, so runs of different recipes (the seed article's, an ablation) are measured alike.
        """
        cfg = self.cfg
        if self.shards:
            batches = ShardBatches(self.shards.tokens("validation"), eos=self.tokenizer.eos_token_id,
                                   block_size=cfg.block_size, micro_batch_size=cfg.micro_batch_size, one_pass=True)
        else:
            batches = PackedBatches(self._documents(True), block_size=cfg.block_size,
                                    micro_batch_size=cfg.micro_batch_size, error_context=self.source, one_pass=True)
        try:
            share = process_share(batches, process_index, num_processes, cfg.eval_batches)
        except UserError:
            raise
        except Exception as e:
            raise self.source.describe_error(e) if self.source else e from None
        if not share:
            raise UserError(self._empty_validation())
        return share

    def _empty_validation(self) -> str:
        if self.mixture:
            return (f"dataset {self.cfg.dataset}: none of its sources has a document for validation; raise "
                    "--val_fraction or give the sources validation splits")
        if self.shards:
            return f"token shards {self.cfg.dataset}: the validation shards hold no tokens; remake them with a larger --val_fraction"
        if self.head:
            return f"dataset {self.cfg.dataset}: its first {self.head} documents are empty; raise --val_documents"
        if self.eval_split:
            return (f"dataset {self.cfg.dataset}: its '{self.eval_split}' split has no documents; "
                    "set --eval_split to a split with documents, or --eval_split '' to hold documents out by hash")
        # Documents are held out whole, so a corpus of one document has none to spare, at any share: raising
        # --val_fraction would only be a wasted try. Two documents are enough to tell (a streamed corpus too).
        column = self.cfg.text_column
        if sum(1 for _ in itertools.islice((ex for ex in self.source.load() if ex[column].strip()), 2)) < 2:
            return (f"dataset {self.cfg.dataset}: it holds a single document, and validation holds out whole "
                    "documents, so no --val_fraction can help; give it more documents (one a file, or one a "
                    "JSON Lines record) or name a validation split with --eval_split")
        return (f"dataset {self.cfg.dataset}: no document is held out for validation at val_fraction "
                f"{self.holdout:g}; raise --val_fraction (a small corpus needs ~0.01 or more) or name a "
                "validation split with --eval_split")

    def texts(self):
        """Training documents as text, for training the tokenizer (never the held-out ones), a mixture's by weight;
        a file that cannot be read is one line, as when the training reads it."""
        column, head = self.cfg.text_column, self.held_out

        def kept(source, frac):
            ds = source.load().select_columns([column]) if self.mixture else source.load()
            return ds.filter(lambda ex: bool(ex[column].strip()) and not (frac > 0 and in_holdout(ex[column], frac))
                             and document_digest(ex[column]) not in head)

        streams = [kept(source, frac) for source, frac in zip(self.sources, self.holdouts)]
        source = self.mixture or self.sources[0]
        try:
            for ex in (self.mixture.mix(streams) if self.mixture else streams[0]):
                yield bounded(ex[column], source)
        except UserError:
            raise
        except Exception as e:
            raise source.describe_error(e) from None


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

    def check_tokenizer(self, tokenizer, name: str) -> None:
        """Documents are found by their leading EOS: another tokenizer's would cut the tokens into nonsense."""
        if tokenizer.eos_token_id != self.meta["eos_token_id"]:
            raise UserError(f"token shards {self.folder} were made with end-of-text id {self.meta['eos_token_id']}, "
                            f"tokenizer {name} has {tokenizer.eos_token_id}: train with --tokenizer "
                            f"{self.folder / 'tokenizer'} (the default for token shards)")

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
    """Rows of block_size tokens from this process's contiguous 1/num_processes slice of the token shards;
    checkpointable.

    shuffle: every epoch reads the slice as blocks in a new random order, cut at a new random offset (nanoGPT
    reads random windows; this reads every token once an epoch); else blocks in order from the start.
    Positions restart at every EOS (a document start) and at every row, as in PackedBatches.
    one_pass=True (validation) reads the slice once in order, its last row padded.
    """

    def __init__(self, tokens, *, eos: int, block_size: int, micro_batch_size: int, document_masking: bool = True,
                 shuffle: bool = False, seed: int = 0, process_index: int = 0, num_processes: int = 1,
                 one_pass: bool = False):
        share = len(tokens) // num_processes
        self.tokens, self.lo, self.hi = tokens, process_index * share, (process_index + 1) * share
        self.eos, self.block_size, self.micro_batch_size = eos, block_size, micro_batch_size
        self.document_masking, self.one_pass = document_masking, one_pass
        self.shuffle, self.seed = shuffle and not one_pass, seed
        self.epoch, self.index = 0, 0  # index: the next block of the epoch's order
        if share < block_size * micro_batch_size and not one_pass:
            raise UserError(f"token shards too small: {share} tokens per process, a batch needs "
                            f"{block_size * micro_batch_size}")
        self._starts = self._epoch_starts()

    def _epoch_starts(self) -> np.ndarray:
        """The first token of each whole block, in the order this epoch reads them."""
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        shift = int(rng.integers(self.block_size)) if rng else 0
        count = (self.hi - self.lo - shift) // self.block_size
        return self.lo + shift + (rng.permutation(count) if rng else np.arange(count)) * self.block_size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        size, n = self.block_size, self.micro_batch_size
        if self.one_pass:
            start = self.lo + self.index * size
            if start >= self.hi:
                raise StopIteration
            rows = as_rows(np.asarray(self.tokens[start:min(start + n * size, self.hi)]), size)
        else:
            if self.index + n > len(self._starts):
                self.epoch, self.index = self.epoch + 1, 0
                self._starts = self._epoch_starts()
            rows = np.stack([np.asarray(self.tokens[s:s + size]) for s in self._starts[self.index:self.index + n]])
        self.index += len(rows)
        batch = token_batch(rows)
        if self.document_masking:
            batch["position_ids"] = positions_from_eos(batch["input_ids"], self.eos)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        # A checkpoint from before blocks were shuffled saved the next token's offset.
        self.index = state["index"] if "index" in state else (state["offset"] - self.lo) // self.block_size
        self._starts = self._epoch_starts()


def positions_from_eos(input_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Every EOS opens a document at position 0; a row's first tokens continue one from before, also at 0."""
    idx = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    starts = torch.where(input_ids == eos, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - starts


def write_token_shards(source: DocumentSource, tokenizer, out: Path, *, holdout: float, shard_tokens: int,
                       max_documents: int = 0, progress=None) -> dict:
    """Tokenize a document source once into TokenShards (train and validation by the same hash split).

    Written aside and swapped in (hf_gpt.files.atomic_folder): an interrupted run never leaves a half folder.
    """
    if out.exists():  # before the pass, which can take hours
        raise UserError(f"{out} already exists; remove it or choose another --output_dir")
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    with atomic_folder(out) as tmp:
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
                "val_fraction": holdout, "shards": shards}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save_pretrained(tmp / "tokenizer")
    return meta
