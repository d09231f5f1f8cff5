import io
import itertools
import json
import re

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_gpt.config import PretrainConfig, UserError
from hf_gpt.data import PackedBatches, PretrainData, ShardBatches, in_holdout
from hf_gpt.loading import load_tokenizer


def make_data(corpus, tokenizer_dir, **overrides) -> PretrainData:
    overrides = {"crop": "", "val_fraction": 0.1, **overrides}
    cfg = PretrainConfig(dataset=str(corpus), tokenizer=str(tokenizer_dir), block_size=64, micro_batch_size=4,
                         **overrides)
    return PretrainData(cfg, load_tokenizer(str(tokenizer_dir)))


def take(batches, n):
    return [next(batches) for _ in range(n)]


def saved_and_loaded(state: dict) -> dict:
    """A stream's state through torch.save and torch.load(weights_only=True), as a checkpoint keeps it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_blocks_are_documents_with_restarting_positions(corpus, tokenizer_dir):
    data = make_data(corpus, tokenizer_dir)
    eos = data.tokenizer.eos_token_id
    for batch in take(data.train_batches(0, 1), 5):
        ids, pos = batch["input_ids"], batch["position_ids"]
        assert ids.shape == pos.shape == (4, 64)
        assert torch.equal(batch["labels"], ids)
        # Every row starts a (possibly continued) document at 0 and counts up by one, except where a
        # new document starts: there the position is 0 and the token is the end-of-text separator.
        assert (pos[:, 0] == 0).all()
        steps = pos[:, 1:] - pos[:, :-1]
        restart = pos[:, 1:] == 0
        assert ((steps == 1) | restart).all()
        assert (ids[:, 1:][restart] == eos).all()


def test_resumed_stream_reads_the_same_tokens(corpus, tokenizer_dir):
    for crop in ("", "random"):
        straight = take(make_data(corpus, tokenizer_dir, crop=crop).train_batches(0, 1), 12)
        first = make_data(corpus, tokenizer_dir, crop=crop).train_batches(0, 1)
        take(first, 5)
        state = saved_and_loaded(first.state_dict())
        second = make_data(corpus, tokenizer_dir, crop=crop).train_batches(0, 1)
        second.load_state_dict(state)
        for a, b in zip(straight[5:], take(second, 7)):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["position_ids"], b["position_ids"])


def test_random_crop_takes_one_window_per_long_document(corpus, tokenizer_dir):
    data = make_data(corpus, tokenizer_dir, crop="random")
    batches = take(data.train_batches(0, 1), 20)
    pos = torch.cat([b["position_ids"] for b in batches])
    # A window never exceeds a block; documents are shorter than the corpus files, so windows differ
    # from the documents' beginnings: fewer windows start with the separator than in plain packing.
    assert pos.max() < 64
    ids = torch.cat([b["input_ids"] for b in batches])
    starts = ids[pos == 0]
    assert (starts != data.tokenizer.eos_token_id).any()


def test_seed_article_mode_has_no_positions(corpus, tokenizer_dir):
    batch = next(make_data(corpus, tokenizer_dir, document_masking=False, crop="start").train_batches(0, 1))
    assert "position_ids" not in batch  # plain causal attention across documents, as the article did


def test_validation_never_seen_in_training(corpus, tokenizer_dir):
    data = make_data(corpus, tokenizer_dir)
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    held_out = [t for t in texts if in_holdout(t, 0.1)]
    assert 0 < len(held_out) < len(texts)
    train_docs = [row["input_ids"] for row in data._documents(False)]
    val_docs = [row["input_ids"] for row in data._documents(True)]
    assert len(train_docs) + len(val_docs) == len(texts)
    assert not {tuple(d) for d in train_docs} & {tuple(d) for d in val_docs}
    assert data.eval_batches(0, 1)  # a fixed validation set exists


def test_processes_read_disjoint_documents(corpus, tokenizer_dir):
    data = make_data(corpus, tokenizer_dir)
    parts = [[tuple(r["input_ids"]) for r in data._documents(False, rank, 2)] for rank in (0, 1)]
    everything = [tuple(r["input_ids"]) for r in data._documents(False)]
    assert parts[0] and parts[1]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)


def test_head_validation_is_the_first_documents_and_no_process_trains_on_them(corpus, tokenizer_dir):
    # The files are read in a new order every epoch and split between processes: the head is still left out.
    data = make_data(corpus, tokenizer_dir, val_documents=10, shuffle_rows=64)
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    decode = data.tokenizer.decode
    assert [decode(r["input_ids"][1:]) for r in data._documents(True)] == texts[:10]
    for processes in (1, 2):
        trained = [decode(r["input_ids"][1:]) for rank in range(processes)
                   for r in data._documents(False, rank, processes)]
        assert sorted(trained) == sorted(texts[10:])
    with pytest.raises(UserError, match="eval_split .* or val_documents"):
        make_data(corpus, tokenizer_dir, val_documents=10, eval_split="validation")


def test_bad_inputs_have_clear_errors(tmp_path, corpus, tokenizer_dir):
    with pytest.raises(UserError, match="dataset path not found"):
        make_data(tmp_path / "missing", tokenizer_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(UserError, match="no documents"):
        next(make_data(empty, tokenizer_dir).train_batches(0, 1))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("fine text " * 50)
    (bad / "broken.txt").write_bytes(b"caf\xe9 au lait " * 50)
    with pytest.raises(UserError, match=r"undecodable bytes in .*broken.txt"):
        take(make_data(bad, tokenizer_dir).train_batches(0, 1), 20)
    jsonl = tmp_path / "j"
    jsonl.mkdir()
    (jsonl / "d.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(UserError, match="no column 'text'"):
        next(make_data(jsonl, tokenizer_dir).train_batches(0, 1))


def test_a_folder_with_split_files_validates_on_its_validation_file(tmp_path, corpus, tokenizer_dir):
    """train-*.parquet + validation.parquet, as load_dataset(folder) splits them: no hash holdout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    folder = tmp_path / "english"
    folder.mkdir()
    pq.write_table(pa.table({"text": texts[:30]}), folder / "train-0000.parquet")
    pq.write_table(pa.table({"text": texts[30:60]}), folder / "train-0001.parquet")
    pq.write_table(pa.table({"text": texts[60:66]}), folder / "validation.parquet")
    data = make_data(folder, tokenizer_dir)
    encode = lambda t: tuple([data.tokenizer.eos_token_id] + data.tokenizer(t)["input_ids"])  # noqa: E731
    assert [tuple(r["input_ids"]) for r in data._documents(True)] == [encode(t) for t in texts[60:66]]
    assert len(list(data._documents(False))) == 60  # every training document, none held out by hash


def test_validation_is_one_pass_over_whole_documents_for_every_recipe(corpus, tokenizer_dir):
    """eval_batches 0 reads every held-out token exactly once, the last batch padded without targets;
    and the seed article's recipe (crop, no document masking) is validated the same way as ours."""
    ours = make_data(corpus, tokenizer_dir, eval_batches=0)
    seed = make_data(corpus, tokenizer_dir, eval_batches=0, crop="start", document_masking=False)
    held_out_tokens = sum(len(r["input_ids"]) for r in ours._documents(True))
    batches = ours.eval_batches(0, 1)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == held_out_tokens
    assert batches[-1]["input_ids"].shape[0] <= 4  # the padded end, not a second pass over the documents
    for mine, theirs in zip(batches, seed.eval_batches(0, 1), strict=True):
        assert mine.keys() == theirs.keys() == {"input_ids", "labels", "position_ids"}
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_an_empty_validation_split_is_named(tmp_path, corpus, tokenizer_dir):
    with pytest.raises(UserError, match=r"no document is held out for validation at val_fraction 1e-05; "
                                        r"raise --val_fraction"):
        make_data(corpus, tokenizer_dir, val_fraction=0.00001).eval_batches(0, 1)


def test_a_corpus_of_one_document_is_not_told_to_raise_val_fraction(tmp_path, corpus, tokenizer_dir):
    """Documents are held out whole: no share can give one document to both training and validation."""
    # One that trains (not held out at the share 0.1), so validation is empty.
    text = next(t for t in (p.read_text() for p in sorted(corpus.glob("*.txt"))) if not in_holdout(t, 0.1))
    (tmp_path / "one.txt").write_text(text)
    with pytest.raises(UserError) as error:
        make_data(tmp_path / "one.txt", tokenizer_dir).eval_batches(0, 1)
    assert str(error.value) == (
        f"dataset {tmp_path / 'one.txt'}: it holds a single document, and validation holds out whole documents, so "
        "no --val_fraction can help; give it more documents (one a file, or one a JSON Lines record) or name a "
        "validation split with --eval_split")


# Mixing: a corpus of long documents, as books, manuals and a person's own writing are.


def long_documents(count: int = 40, rows: int = 8, block_size: int = 16) -> list[list[int]]:
    """Document i is [EOS=0] and then the token i + 1 throughout, `rows` rows long: a row's tokens say which
    documents it holds."""
    return [[0] + [i + 1] * (rows * block_size - 1) for i in range(count)]


def documents_of(row: torch.Tensor) -> set[int]:
    return set(row.tolist()) - {0}


def packed(docs: list[list[int]], shuffle_rows: int, seed: int = 0) -> PackedBatches:
    stream = Dataset.from_dict({"input_ids": docs}).to_iterable_dataset(num_shards=4)
    return PackedBatches(stream, block_size=16, micro_batch_size=8, shuffle_rows=shuffle_rows, seed=seed)


def test_a_micro_batch_of_long_documents_mixes_many_of_them():
    docs = long_documents()
    in_order = take(packed(docs, 0), 10)
    mixed = take(packed(docs, 128), 10)
    # In stream order a micro-batch of 8 rows is one or two documents' consecutive pieces.
    assert max(len(set().union(*map(documents_of, b["input_ids"]))) for b in in_order) <= 2
    # Drawn from the buffer, its rows come from (nearly) as many documents as it has rows.
    assert min(len(set().union(*map(documents_of, b["input_ids"]))) for b in mixed) >= 6


def test_each_epoch_is_one_pass_in_a_new_order_and_the_buffer_stays_bounded():
    docs = long_documents()
    batches = packed(docs, 128)
    epochs = [take(batches, 40), take(batches, 40)]  # 40 documents x 8 rows = 40 micro-batches of 8
    assert len(batches._rows) <= 128 + 8  # the buffer, and at most one document's rows beyond it
    rows = [torch.cat([b["input_ids"] for b in epoch]) for epoch in epochs]
    for epoch in rows:  # every row of the corpus exactly once an epoch
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, torch.cat(
            [b["input_ids"] for b in take(packed(docs, 0), 40)]).tolist()))
    assert not torch.equal(rows[0], rows[1])  # in another order
    assert not torch.equal(rows[0], torch.cat([b["input_ids"] for b in take(packed(docs, 128, seed=1), 40)]))


def test_a_buffered_stream_resumes_exactly_mid_epoch():
    docs = long_documents()
    straight = take(packed(docs, 64), 60)
    first = packed(docs, 64)
    take(first, 23)
    second = packed(docs, 64)
    second.load_state_dict(saved_and_loaded(first.state_dict()))
    for a, b in zip(straight[23:], take(second, 37), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["position_ids"], b["position_ids"])


def test_local_files_of_long_documents_train_in_mixed_batches(tmp_path, tokenizer_dir):
    """The real path: parquet files read through datasets' shuffle, packed and drawn from the buffer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "books"
    folder.mkdir()
    texts = [" ".join(f"w{i}" for _ in range(400)) for i in range(40)]  # ~1,200 tokens: ~19 rows of 64
    for f in range(8):
        pq.write_table(pa.table({"text": texts[f * 5:(f + 1) * 5]}), folder / f"train-{f:04d}.parquet")
    tokenizer = load_tokenizer(str(tokenizer_dir))

    def documents(batch) -> list[int]:
        # The marks whole inside each row (a row's first and last may be cut) name its documents.
        return [len({m for row in batch["input_ids"] for m in re.findall(r"w(\d+)", tokenizer.decode(row))[1:-1]})]

    def epoch_rows(shuffle_rows):
        batches = make_data(folder, tokenizer_dir, shuffle_rows=shuffle_rows, val_fraction=0.0).train_batches(0, 1)
        return take(batches, 40)

    assert max(sum(map(documents, epoch_rows(0)[:10]), [])) <= 2
    stream = make_data(folder, tokenizer_dir, val_fraction=0.0)._documents(False)
    orders = []
    for epoch in (0, 1):  # datasets' shuffle: the files in another order, read interleaved
        stream.set_epoch(epoch)
        orders.append([re.search(r"w(\d+)", tokenizer.decode(d["input_ids"])).group(1) for d in stream])
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) and len(orders[0]) == 40
    mixed = epoch_rows(2048)
    assert min(sum(map(documents, mixed[:10]), [])) >= 3
    first, second = torch.cat([b["input_ids"] for b in mixed[:10]]), torch.cat([b["input_ids"] for b in mixed[-10:]])
    assert not torch.equal(first, second)


def shard_tokens(docs: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs])


def test_token_shards_are_read_as_a_new_permutation_of_blocks_every_epoch():
    tokens = shard_tokens(long_documents())  # 5,120 tokens: 320 blocks of 16, 40 micro-batches of 8
    make = lambda **kw: ShardBatches(tokens, eos=0, block_size=16, micro_batch_size=8, **kw)  # noqa: E731
    in_order = take(make(), 5)
    assert max(len(set().union(*map(documents_of, b["input_ids"]))) for b in in_order) <= 2
    batches = make(shuffle=True, seed=3)
    epochs = [torch.cat([b["input_ids"] for b in take(batches, 39)]) for _ in range(2)]  # a random offset: 319 blocks
    for b in epochs[0].split(8):
        assert len(set().union(*map(documents_of, b))) >= 6
    assert not torch.equal(epochs[0], epochs[1])
    # Each epoch reads each token at most once: every document's tokens, counted, never exceed its length.
    for epoch in epochs:
        assert np.bincount(epoch.flatten().numpy(), minlength=41)[1:].max() <= 8 * 16
    # Resumed mid-epoch, as a checkpoint saves it.
    straight = take(make(shuffle=True, seed=3), 60)
    first = make(shuffle=True, seed=3)
    take(first, 45)
    second = make(shuffle=True, seed=3)
    second.load_state_dict(saved_and_loaded(first.state_dict()))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(straight[45:], take(second, 15)))


def two_sources(tmp_path, sizes=(60, 60)) -> list:
    """Two local corpora of JSON Lines whose documents say which source and which document they are (`a 7 ...`,
    `b 3 ...`): the first holds its last 6 documents in its own validation file, the second has its held out by
    hash."""
    def write(path, name, numbers):
        path.write_text("".join(json.dumps({"text": f"{name} {i} " + "words of some length " * 5}) + "\n"
                                for i in numbers))

    a, b = tmp_path / "a", tmp_path / "b.jsonl"
    a.mkdir()
    write(a / "train.jsonl", "a", range(sizes[0] - 6))
    write(a / "validation.jsonl", "a", range(sizes[0] - 6, sizes[0]))
    write(b, "b", range(sizes[1]))
    return [a, b]


def mixed(sources, tokenizer_dir, **overrides) -> PretrainData:
    return make_data(",".join(map(str, sources)), tokenizer_dir, val_fraction=0.2, **overrides)


def source_of(tokenizer, ids) -> tuple[str, int]:
    name, number = tokenizer.decode(ids[1:]).split()[:2]  # after the EOS that opens every document
    return name, int(number)


def test_a_mixture_draws_each_source_by_its_weight_and_validates_on_each(tmp_path, tokenizer_dir):
    sources = two_sources(tmp_path, sizes=(200, 60))
    data = mixed(sources, tokenizer_dir, dataset_weights=[3, 1], shuffle_rows=0)
    documents = [source_of(data.tokenizer, d["input_ids"]) for d in itertools.islice(data._documents(False), 400)]
    share = sum(name == "a" for name, _ in documents) / len(documents)
    assert abs(share - 0.75) < 0.06, share
    # all_exhausted: the smaller source starts again before the larger one is read whole
    assert len([d for d in documents if d[0] == "b"]) > len({d for d in documents if d[0] == "b"})

    held_b = {i for i in range(60) if in_holdout(f"b {i} " + "words of some length " * 5, 0.2)}
    validation = [source_of(data.tokenizer, d["input_ids"]) for d in data._documents(True)]
    assert sorted(validation) == sorted([("a", i) for i in range(194, 200)] + [("b", i) for i in held_b])
    assert not {d for d in documents if d[0] == "b"} & {("b", i) for i in held_b}  # held out from training
    assert len(data.eval_batches(0, 1)) >= 1

    first = mixed(sources, tokenizer_dir, dataset_weights=[1, 3], stopping_strategy="first_exhausted")
    documents = [source_of(data.tokenizer, d["input_ids"]) for d in first._documents(False)]
    assert len({d for d in documents if d[0] == "b"}) == 60 - len(held_b)  # the epoch ends with b, read once
    assert abs(sum(name == "b" for name, _ in documents) / len(documents) - 0.75) < 0.08


def test_a_mixture_resumes_exactly(tmp_path, tokenizer_dir):
    sources = two_sources(tmp_path)
    make = lambda: mixed(sources, tokenizer_dir, dataset_weights=[0.7, 0.3], shuffle_rows=64)  # noqa: E731
    straight = take(make().train_batches(0, 1), 40)  # several epochs of the smaller source
    first = make().train_batches(0, 1)
    take(first, 17)
    state = saved_and_loaded(first.state_dict())
    second = make().train_batches(0, 1)
    second.load_state_dict(state)
    for a, b in zip(straight[17:], take(second, 23)):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["position_ids"], b["position_ids"])


def test_a_mixture_is_refused_in_one_line_before_any_work(tmp_path, tokenizer_dir):
    from hf_gpt.config import load_config

    with pytest.raises(UserError, match=r"dataset_weights gives 3 weight\(s\) for the 2 source\(s\)"):
        load_config(PretrainConfig, ["--dataset", "a, b", "--dataset_weights", "1", "2", "3"])
    with pytest.raises(UserError, match="dataset_weights must all be above 0"):
        load_config(PretrainConfig, ["--dataset", "a,b", "--dataset_weights", "1", "0"])
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("dataset: data/english, data/code\ndataset_weights: [0.7, 0.3]\n")
    cfg = load_config(PretrainConfig, ["--config", str(recipe)])
    assert (cfg.dataset, cfg.dataset_weights) == ("data/english, data/code", [0.7, 0.3])


def test_processes_read_disjoint_documents_of_a_mixture(tmp_path, tokenizer_dir):
    """Every document once (all_exhausted repeats the sources that run out first, by design), split between two
    processes: each reads its own, and together they read them all."""
    data = mixed(two_sources(tmp_path), tokenizer_dir, dataset_weights=[0.5, 0.5],
                 stopping_strategy="all_exhausted_without_replacement")
    reads = [{source_of(data.tokenizer, d["input_ids"]) for d in data._documents(False, rank, 2)} for rank in (0, 1)]
    everything = {source_of(data.tokenizer, d["input_ids"]) for d in data._documents(False)}
    assert reads[0] and reads[1] and not reads[0] & reads[1] and reads[0] | reads[1] == everything


@pytest.mark.parametrize("kind, message", [
    ("not UTF-8", "undecodable bytes in FOLDER/a.txt (byte 6); fix the file or set data_encoding_errors: replace"),
    ("binary", "undecodable bytes in FOLDER/a.txt"),
    ("malformed JSON Lines", "ArrowInvalid: JSON parse error"),
    ("one long line", "a document of 1,200,000 characters (starting 'word word word word word word word word '), "
                      "longer than the 1,000,000 a document may have; split it into several"),
])
def test_a_file_the_tokenizer_cannot_train_on_is_one_line(tmp_path, kind, message):
    """With the default tokenizer: train, these files are read first by the tokenizer's training, which said so
    in a traceback (with a given tokenizer the training data's reader already said it in one line). A document
    too long to tokenize in bounded memory is refused as LoRA refuses one."""
    from hf_gpt.tokenizer import train_bpe

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt" if kind != "malformed JSON Lines" else folder / "b.jsonl").write_text(
        "fine text\n" * 40 if kind != "malformed JSON Lines" else '{"text": "fine text"}\n')
    if kind == "not UTF-8":
        (folder / "a.txt").write_bytes(b"hello \xff\xfe world\n" * 50)
    elif kind == "binary":
        (folder / "a.txt").write_bytes(bytes(range(128, 256)) * 40)
    elif kind == "malformed JSON Lines":
        (folder / "a.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    else:
        (folder / "a.txt").write_text("word " * 240_000)
    data = PretrainData(PretrainConfig(dataset=str(folder), val_fraction=0.0), tokenizer=None)
    with pytest.raises(UserError) as error:
        train_bpe(data.texts(), vocab_size=300, max_documents=100)
    assert str(error.value).startswith(f"dataset {folder}: ")
    assert message.replace("FOLDER", str(folder)) in str(error.value) and "\n" not in str(error.value)
