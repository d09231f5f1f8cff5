import json

import pytest
import torch

from hf_gpt.config import PretrainConfig, UserError
from hf_gpt.data import PretrainData, in_holdout
from hf_gpt.loading import load_tokenizer


def make_data(corpus, tokenizer_dir, **overrides) -> PretrainData:
    overrides = {"crop": "", "val_fraction": 0.1, **overrides}
    cfg = PretrainConfig(dataset=str(corpus), tokenizer=str(tokenizer_dir), block_size=64, micro_batch_size=4,
                         **overrides)
    return PretrainData(cfg, load_tokenizer(str(tokenizer_dir)))


def take(batches, n):
    return [next(batches) for _ in range(n)]


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
        state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
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
