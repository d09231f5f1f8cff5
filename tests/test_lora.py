"""LoRA on a person's writing: reading the folder, the split, the batches, the adapter and merged model
that the script writes, the before/after report, and that the writing never leaves as text."""

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import ROOT, run_script
from hf_gpt import lora
from hf_gpt.config import UserError, load_config, run_cli
from hf_gpt.engine import evaluate
from hf_gpt.loading import load_tokenizer
from hf_gpt.lora import LoraRunConfig, WritingData, as_documents, pack_documents
from hf_gpt.recipes import run_lora
from hf_gpt.tokenizer import token_byte_lengths
from hf_gpt.writing import read_writing, split_documents

WRITING = ROOT / "tests" / "data" / "writing"
NOTES = sorted(p for p in WRITING.rglob("*") if p.suffix in (".txt", ".md") and p.name not in (
    ".unsent.txt", "empty-draft.md", "phone-export.txt"))  # the 13 readable notes, one a duplicate
TRIGGER = "<|me|>"


def make_base(folder: Path, tokenizer_dir: Path, spare_rows: int, initializer_range: float = 0.02) -> Path:
    """A tiny random GPT-2 with the test tokenizer. spare_rows > 0 pads the vocabulary as hf_gpt.model
    does for real models (a new token takes a spare row); 0 makes the embedding grow for one."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer) + spare_rows,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=initializer_range,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_args(base: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(base), "--dataset", str(WRITING), "--output_dir", str(out), "--block_size", "64",
            "--mixed_precision", "no", "--learning_rate", "1e-2", "--log_every", "5", "--max_new_tokens", "12", *extra]


@pytest.fixture(scope="module")
def trigger_run(tmp_path_factory, tokenizer_dir):
    """The script end to end: LoRA with a trigger token and --merge, on a base with spare vocabulary rows."""
    root = tmp_path_factory.mktemp("lora")
    base = make_base(root / "base", tokenizer_dir, spare_rows=64)
    out = root / "run"
    result = run_script("scripts/lora.py", *run_args(base, out, "--trigger_token", TRIGGER, "--merge",
                                                    "--max_steps", "20"))
    return base, out, result


def test_reading_a_folder_skips_and_deduplicates():
    writing = read_writing(str(WRITING))
    texts = {p.read_text().strip() for p in NOTES}
    assert len(NOTES) == 13 and len(texts) == 12
    assert sorted(writing.documents) == sorted(texts)  # subfolders read, each text once
    assert writing.files == 13
    assert writing.skipped == {"hidden": 1, "empty": 1, "binary": 1, "duplicate": 1, "not .txt/.md": 1}
    assert writing.describe() == ("12 documents from 13 files (skipped 1 binary, 1 duplicate, 1 empty, "
                                  "1 hidden, 1 not .txt/.md)")


def test_hidden_folders_paragraphs_and_line_endings(tmp_path):
    (tmp_path / ".obsidian").mkdir()
    (tmp_path / ".obsidian" / "workspace.md").write_text("editor state")
    (tmp_path / "story.txt").write_bytes("\ufeffFirst paragraph,\r\nstill first.\r\n\r\n  \r\nSecond.\r\n\r\nFirst paragraph,\r\nstill first.".encode())
    writing = read_writing(str(tmp_path), split_paragraphs=True)
    assert writing.documents == ["First paragraph,\nstill first.", "Second."]
    assert writing.skipped == {"hidden": 1, "duplicate": 1}
    assert read_writing(str(tmp_path / "story.txt")).files == 1  # one file named directly


def test_held_out_documents_are_whole_and_always_the_same():
    docs = read_writing(str(WRITING)).documents
    train, held = split_documents(docs, 0.2)
    assert len(held) == 2 and len(train) == 10
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    shuffled = random.Random(0).sample(docs, len(docs))
    assert sorted(split_documents(shuffled, 0.2)[1]) == sorted(held)  # by content, not by order or name
    with pytest.raises(UserError, match="at least 2"):
        split_documents(docs[:1], 0.2)


def test_training_stream_resumes_exactly_and_processes_share_documents():
    cfg = LoraRunConfig(block_size=16, micro_batch_size=2, seed=3)
    ids = [[i] * (4 + i) for i in range(1, 11)]  # every token names its document
    data = WritingData(cfg, ids, ids[:1], eos=0, trigger_id=99)
    stream = data.train_batches(0, 1)
    [next(stream) for _ in range(3)]
    state = stream.state_dict()
    ahead = [next(stream) for _ in range(12)]  # ~3 epochs of 85 tokens: crosses reshuffles
    resumed = data.train_batches(0, 1)
    resumed.load_state_dict(state)
    for a, b in zip(ahead, [next(resumed) for _ in range(12)]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = torch.cat([b["input_ids"] for b in ahead])  # rows drawn at random: EOS and trigger may be cut apart
    row, column = (rows == 99).nonzero().unbind(1)
    assert len(row) >= 20 and (rows[row[column > 0], column[column > 0] - 1] == 0).all()  # right after each EOS
    assert all((b["labels"][b["input_ids"] == 99] == -100).all() for b in ahead)  # and never a target

    def documents(batches, epoch):
        batches.documents.set_epoch(epoch)
        return [row["input_ids"][2] for row in batches.documents]

    orders = [documents(data.train_batches(0, 1), epoch) for epoch in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(1, 11)) and orders[0] != orders[1]
    shares = [documents(data.train_batches(rank, 2), 0) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(1, 11)) and not set(shares[0]) & set(shares[1])


def test_held_out_packing_scores_every_token_once():
    docs = as_documents([[5] * 7, [6] * 30, [7] * 3], eos=0, trigger_id=9)
    batches = pack_documents(docs, block_size=16, micro_batch_size=2, eos=0, no_loss=9)
    n = sum(map(len, docs))
    ids = torch.cat([b["input_ids"] for b in batches]).flatten()
    assert len(ids) == 48 and ids[:n].tolist() == sum(docs, []) and (ids[n:] == 0).all()
    labels = torch.cat([b["labels"] for b in batches]).flatten()
    assert (labels[n:] == -100).all() and (labels[ids == 9] == -100).all()
    assert labels[:n][ids[:n] != 9].tolist() == [t for t in sum(docs, []) if t != 9]
    positions = torch.cat([b["position_ids"] for b in batches])
    assert positions[0].tolist() == list(range(9)) + list(range(7))  # restart at the second document


def test_adapter_and_merged_model_load_and_agree(trigger_run):
    base, run, _ = trigger_run
    from peft import AutoPeftModelForCausalLM, PeftModel

    adapter = run / "adapter"
    # provenance.json arrives with the folder's swap, not after it: copied anywhere, the adapter says what it learnt
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "provenance.json"} <= {
        p.name for p in adapter.iterdir()}
    assert not list(adapter.glob("model*.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    trigger_id = tokenizer.convert_tokens_to_ids(TRIGGER)
    assert config["trainable_token_indices"] == [trigger_id] == [512]  # a spare row of the base
    weights = load_file(adapter / "adapter_model.safetensors")
    assert all("lora_" in k or "trainable_tokens_delta" in k for k in weights)  # adapter weights only

    ids = torch.tensor([tokenizer(TRIGGER + "Dear diary, the tide came in.").input_ids])
    assert ids[0, 0] == trigger_id
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)
        explicit = PeftModel.from_pretrained(plain, adapter).eval()(ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
        merged = merged_model(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert type(merged_model).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(explicit, auto, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged, auto, atol=1e-5, rtol=1e-5)
    assert (auto - base_logits).abs().max() > 1e-3  # the adapter does something


def test_report_measures_base_against_adapted(trigger_run, tokenizer_dir):
    base, run, result = trigger_run
    report = json.loads((run / "report.json").read_text())
    h, g = report["heldout_perplexity"], report["general_perplexity"]
    assert h["adapted_with_trigger"] < h["base"] and h["adapted"] < h["base"]
    assert g["written_by_base"] and g["tokens"] > 0 and g["base"] > 0 and g["adapted"] > 0
    assert report["writing"]["heldout_documents"] == 2 and report["training"]["steps"] == 20
    # "base" is the base model as given: recomputed here from the files, on the held-out documents.
    cfg = load_config(LoraRunConfig, ["--block_size", "64"])
    tokenizer = load_tokenizer(str(base))
    held = split_documents(read_writing(str(WRITING)).documents, 0.2)[1]
    ids = tokenizer(held, add_special_tokens=False)["input_ids"]
    batches = pack_documents(as_documents(ids, tokenizer.eos_token_id), block_size=64,
                             micro_batch_size=cfg.micro_batch_size, eos=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(base)
    expected = evaluate(model, batches, token_byte_lengths(tokenizer, 576), "sdpa")
    assert h["base"] == pytest.approx(expected["val_ppl"], rel=1e-6)
    # Before training: what the run will cost, in one line (20 steps of 4 x 64 tokens; each document after
    # its EOS and the trigger).
    train = split_documents(read_writing(str(WRITING)).documents, 0.2)[0]
    train_tokens = sum(map(len, tokenizer(train, add_special_tokens=False)["input_ids"]))
    assert (f"cost: 10 documents to train on ({train_tokens:,} tokens), 2 held out ({sum(map(len, ids)):,} tokens); "
            f"--max_steps 20: 20 steps of 256 tokens (5,120 tokens, {5_120 / (train_tokens + 20):.1f} passes over "
            "the training documents)") in result.stdout
    assert sum(report["writing"]["skipped"].values()) == 5
    assert "12 documents from 13 files (skipped 1 binary, 1 duplicate, 1 empty, 1 hidden, 1 not .txt/.md)" in result.stdout
    assert "held-out perplexity on your writing: base" in result.stdout
    md = (run / "report.md").read_text()
    assert f"{h['base']:.2f}" in md and f"{h['adapted_with_trigger']:.2f}" in md


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?;:])\s+|\n+", text)
    return [p.strip(" -#*0123456789.") for p in parts if len(p.split()) >= 4]


def test_the_writing_never_leaves_as_text(trigger_run):
    _, run, result = trigger_run
    private = [s for p in [*NOTES, WRITING / ".unsent.txt"] for s in sentences(p.read_text())]
    assert len(private) > 60
    samples = run / "samples.private.md"
    assert samples.read_text().startswith("# PRIVATE")
    shared = {"console": result.stdout + result.stderr}
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".yaml", ".txt") and path != samples:
            shared[str(path.relative_to(run))] = path.read_text()
    assert {"report.md", "report.json", "metrics.jsonl", "summary.json", "config.yaml", "adapter/adapter_config.json",
            "adapter/README.md", "merged/config.json"} <= set(shared)
    leaks = [(name, s) for name, text in shared.items() for s in private if s in text]
    assert not leaks, leaks[:3]


def test_trigger_alone_leaves_text_without_it_unchanged(tmp_path, tokenizer_dir, corpus):
    """r=0 trains only the trigger's embedding row, here on a base with no spare row (the embedding
    grows by one, as AutoPeftModelForCausalLM grows the base on loading)."""
    from peft import AutoPeftModelForCausalLM

    base = make_base(tmp_path / "base", tokenizer_dir, spare_rows=0)
    cfg = load_config(LoraRunConfig, run_args(base, tmp_path / "run", "--r", "0", "--trigger_token", TRIGGER,
                                              "--max_steps", "25", "--learning_rate", "5e-2",
                                              "--general_text", str(corpus)))
    report = run_lora(cfg)
    h, g = report["heldout_perplexity"], report["general_perplexity"]
    # What the row learns cannot be seen on held-out text here: a tiny random base barely reacts to
    # one embedding row, and the measured with/without-trigger gap is noise of either sign. The row
    # is trained (below) and everything else is shown to stay as it was.
    # Without the trigger only the new token's own probability moves (here about 1/513 of the mass).
    assert h["adapted"] == pytest.approx(h["base"], rel=5e-3)
    assert g["text"].startswith("the first") and g["adapted"] == pytest.approx(g["base"], rel=5e-3)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    ids = torch.tensor([tokenizer("Dear diary, the kettle has a cough.").input_ids])
    with torch.no_grad():
        adapted = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter").eval()(ids).logits
        original = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert adapted.shape[-1] == original.shape[-1] + 1
    deltas = [v for k, v in load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").items()
              if "trainable_tokens_delta" in k]  # PEFT stores the trained rows alone
    assert deltas and all(v.shape[0] == 1 and v.abs().sum() > 0 for v in deltas)
    torch.testing.assert_close(adapted[..., :-1], original, atol=0, rtol=0)  # all but the trigger's own logit


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "no/such/notes"], "writing not found: no/such/notes"),
    (["--dataset", "EMPTY"], "no text to learn from in it (0 documents from 0 files (skipped 1 binary, 1 hidden))"),
    (["--target_modules", "q_proj"], "PEFT could not wrap"),
    (["--r", "0"], "set --trigger_token too"),
])
def test_bad_input_gets_one_clear_line(tmp_path, tokenizer_dir, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".draft.md").write_text("hidden")
    (empty / "scan.txt").write_bytes(b"\x00\x01")
    base = make_base(tmp_path / "base", tokenizer_dir, spare_rows=0)
    extra = [str(empty) if x == "EMPTY" else x for x in extra]
    with pytest.raises(UserError, match=re.escape(message)):
        run_lora(load_config(LoraRunConfig, run_args(base, tmp_path / "run", "--max_steps", "1", *extra)))


def refusal(cfg: LoraRunConfig, capsys) -> str:
    """run_lora as scripts/lora.py runs it: the one line on stderr, after checking it is one line and exit 2."""
    capsys.readouterr()  # what came before (making the base model)
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: run_lora(cfg))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1 and err.strip().startswith("error: "), err
    return err


@pytest.mark.parametrize("limit, value, extra, message", [
    # A 6,000-character line where a document may have 1,000 (1,000,000 by default: a 50 MB line took 7 GB)...
    ("MAX_DOCUMENT_CHARS", 1_000, [], "line.txt: 6,000 characters in one document (each file is one), longer than "
                                      "the 1,000 a document may have: pass --split_paragraphs"),
    # ... is one paragraph too.
    ("MAX_DOCUMENT_CHARS", 1_000, ["--split_paragraphs"], "line.txt: a paragraph of 6,000 characters, longer than the "
                                                          "1,000 a document may have: break it up with blank lines"),
    # All files together: never read past the limit.
    ("MAX_WRITING_BYTES", 5_000, [], "writing: more than 0.005 MB of .txt/.md files (reached at"),
], ids=["long file", "long paragraph", "too much writing"])
def test_oversized_writing_is_refused_before_anything_is_made(tmp_path, tokenizer_dir, monkeypatch, capsys,
                                                              limit, value, extra, message):
    monkeypatch.setattr(f"hf_gpt.writing.{limit}", value)
    writing = tmp_path / "writing"
    writing.mkdir()
    (writing / "a-note.txt").write_text("A short note about the tide.\n\nAnother paragraph.")
    (writing / "line.txt").write_text("x" * 6_000)
    base = make_base(tmp_path / "base", tokenizer_dir, spare_rows=0)
    cfg = load_config(LoraRunConfig, run_args(base, tmp_path / "run", "--dataset", str(writing), *extra))
    assert message in refusal(cfg, capsys)
    assert not (tmp_path / "run").exists()


def test_epochs_set_at_most_a_sane_number_of_steps(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """--epochs sets max_steps up to MAX_EPOCH_STEPS (10,000; 5 here); past it the user must ask with --max_steps."""
    monkeypatch.setattr(lora, "MAX_EPOCH_STEPS", 5)
    base = make_base(tmp_path / "base", tokenizer_dir, spare_rows=0)
    train = split_documents(read_writing(str(WRITING)).documents, 0.2)[0]
    tokens = sum(map(len, load_tokenizer(str(base))(train, add_special_tokens=False)["input_ids"]))
    steps = math.ceil(3 * (tokens + len(train)) / 256)  # 3 passes over the documents, each after its EOS
    assert steps > 5
    err = refusal(load_config(LoraRunConfig, run_args(base, tmp_path / "run")), capsys)
    assert (f"3 epochs of {tokens:,} tokens take {steps} steps of 256 tokens, more than the 5 --epochs may set: "
            "pass --max_steps") in err
    assert not (tmp_path / "run").exists()
    counts = {"train_documents": len(train), "train_tokens": tokens, "heldout_documents": 2, "heldout_tokens": 9}
    asked = load_config(LoraRunConfig, run_args(base, tmp_path / "run", "--max_steps", "50000"))
    assert "--max_steps 50000: 50,000 steps of 256 tokens" in lora.plan_steps(asked, counts, 1)


def test_run_folders_keep_their_base_and_privacy_when_moved(tmp_path, tokenizer_dir, monkeypatch):
    """Trained from a relative --model, the adapter still loads from any other folder (its base is recorded as an
    absolute path); adapter/ and merged/ say they hold someone's writing, so their copies push as private."""
    from peft import AutoPeftModelForCausalLM

    from hf_gpt.hub import read_folder

    make_base(tmp_path / "base", tokenizer_dir, spare_rows=64)
    monkeypatch.chdir(tmp_path)
    run_lora(load_config(LoraRunConfig, run_args(Path("base"), Path("run"), "--max_steps", "1", "--merge")))
    elsewhere = tmp_path / "elsewhere"
    for name in ("adapter", "merged"):
        shutil.copytree(tmp_path / "run" / name, elsewhere / name)
    monkeypatch.chdir(elsewhere)
    config = json.loads(Path("adapter", "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    AutoPeftModelForCausalLM.from_pretrained("adapter")
    for name in ("adapter", "merged"):
        info = read_folder(name)
        assert not info.summary and info.personal and info.visibility(None) is True


def test_recipe_file_holds_the_defaults():
    recipe = load_config(LoraRunConfig, ["--config", str(ROOT / "configs" / "lora.yaml")])
    assert recipe == LoraRunConfig()  # the YAML spells the defaults out; unknown keys would be errors
