"""scripts/compare.py and the scoring behind it, on tiny models whose next-token distribution is
known exactly, so every expected figure is worked out by hand:

- "uniform": every weight zero, so every logit is 0 and each token costs ln(V) nats;
- "unigram": every weight zero except ln_f's bias (e_0) and column 0 of the tied embedding, so the
  logits are that column whatever the input: " cat" 2, " elephant" 1, every other token 0.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import run_script
from hf_gpt.benchmarks import (hellaswag_item, load_benchmark, run_hellaswag, run_lambada, run_wikitext,
                               wikitext_detokenize)
from hf_gpt.compare import resolve_tasks, samples_and_speed
from hf_gpt.config import UserError
from hf_gpt.evaluation import encode_pair, encode_pairs, heldout_loss, loglikelihood, rolling_windows
from hf_gpt.loading import load_model, load_tokenizer
from hf_gpt.tokenizer import train_bpe

ANIMALS = {" cat": 2.0, " elephant": 1.0, " dog": 0.0, " mouse": 0.0}
SENTENCES = ["the zoo has a cat", "the zoo has an elephant", "the zoo has a dog", "the zoo has a mouse",
             "A quick brown fox jumps over the lazy dog.", "Models learn to predict the next word of a text."]
HELD_OUT = ("The zoo opened a new café for the elephant keepers; a naïve visitor asked whether the cat "
            "was for sale. It was not. The keepers laughed, and the dog barked at the mouse all afternoon.")


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe(iter(SENTENCES * 50), vocab_size=400, max_documents=10**6)
    for word in ANIMALS:  # the hand calculations below need each animal to be one token
        assert len(tok.encode(word)) == 1, word
    return tok


def save_model(folder, tokenizer, logits: dict[str, float] | None = None, n_positions: int = 16):
    """A GPT-2 that ignores its input (see the module docstring); saved with its tokenizer."""
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=8, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        if logits:
            model.transformer.ln_f.bias[0] = 1.0
            for token, value in logits.items():
                model.transformer.wte.weight[tokenizer.encode(token)[0], 0] = value
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def uniform_dir(tmp_path_factory, tokenizer):
    return save_model(tmp_path_factory.mktemp("uniform"), tokenizer)


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory, tokenizer):
    return save_model(tmp_path_factory.mktemp("unigram"), tokenizer, ANIMALS)


def log_z(vocab: int) -> float:
    """log of the unigram model's normaliser: e^2 + e^1 + (V - 2) e^0."""
    return math.log(math.exp(2) + math.exp(1) + vocab - 2)


def test_rolling_windows_score_every_token_once_as_lm_eval():
    tokens = list(range(10, 20))
    # Worked out from lm-eval's get_rolling_token_windows(max_seq_len=4, context_len=1) + make_disjoint_window.
    assert rolling_windows(tokens, prefix=0, max_length=4) == [
        ([0], [10, 11, 12, 13]),
        ([13], [14, 15, 16, 17]),
        ([15, 16, 17], [18, 19]),  # the short last window is filled up with context to 4 inputs
    ]
    assert rolling_windows([], prefix=0, max_length=4) == []


def test_context_and_continuation_split_as_lm_eval(tokenizer):
    ctx, cont = encode_pair(tokenizer, "the zoo has a ", "cat")  # trailing space moves to the continuation
    assert ctx == tokenizer.encode("the zoo has a")
    assert tokenizer.decode(cont) == " cat" and len(cont) == 1
    assert encode_pair(tokenizer, "", " cat") == ([tokenizer.eos_token_id], tokenizer.encode(" cat"))


def test_pairs_encoded_together_as_one_at_a_time(tokenizer):
    pairs = [("the zoo has a ", "cat"), ("the zoo has a", " dog"), ("the zoo has a", " cat"), ("", " cat"),
             ("Zoo: keepers", " feed"), ("the zoo has a ", "cat")]  # shared and repeated contexts, an empty one
    expected = []
    for context, continuation in pairs:  # encode_pair's rule, one string at a time
        if not context:
            expected.append(([tokenizer.eos_token_id], tokenizer.encode(continuation)))
            continue
        stripped = context.rstrip()
        ctx, whole = tokenizer.encode(stripped), tokenizer.encode(stripped + context[len(stripped):] + continuation)
        expected.append((ctx, whole[len(ctx):]))
    assert encode_pairs(tokenizer, pairs) == expected


def test_whitespace_only_context_is_scored_as_an_empty_one(unigram_dir, tokenizer):
    # Its spaces move to the continuation, which is then scored after the prefix token, as for "".
    assert encode_pairs(tokenizer, [("  ", " cat")]) == encode_pairs(tokenizer, [("", "   cat")])
    model, tok = load_model(str(unigram_dir))
    (ll, _), (expected, _) = loglikelihood(model, tok, [("  ", "cat"), ("", "  cat")])
    assert math.isfinite(ll) and ll == pytest.approx(expected, abs=1e-6)


def test_uniform_model_heldout_loss_is_ln_vocab(uniform_dir, tokenizer):
    model, tok = load_model(str(uniform_dir))
    n_tokens, vocab = len(tok.encode(HELD_OUT)), len(tok)
    assert n_tokens > 3 * 16  # several rolling windows of the 16-position model
    scores = heldout_loss(model, tok, [HELD_OUT])
    assert scores["val_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert scores["val_ppl"] == pytest.approx(vocab, rel=1e-6)
    # 'é' and 'ï' are 2 bytes each in UTF-8: bytes are counted in the text, not in characters.
    n_bytes = len(HELD_OUT) + 2
    assert n_bytes == len(HELD_OUT.encode("utf-8"))
    assert scores["val_bpb"] == pytest.approx(n_tokens * math.log2(vocab) / n_bytes, rel=1e-6)


def test_hellaswag_by_hand(unigram_dir):
    model, tok = load_model(str(unigram_dir))
    z = log_z(len(tok))
    endings = ["cat", "elephant", "dog", "mouse"]
    lls = [ll for ll, _ in loglikelihood(model, tok, [("Zoo: the zoo has a", " " + e) for e in endings])]
    assert lls == pytest.approx([2 - z, 1 - z, -z, -z], abs=1e-5)
    # acc takes the highest log-likelihood (cat); acc_norm divides by characters: (1 - z)/8 beats
    # (2 - z)/3, -z/3 and -z/5 (z is about 5.8), so it takes elephant. (Dividing by tokens, 1 each,
    # would take cat again.)
    docs = [{"activity_label": "Zoo", "ctx_a": "the zoo has a", "ctx_b": "", "endings": endings, "label": label}
            for label in ("1", "1", "0")]
    assert run_hellaswag(model, tok, docs) == {"hellaswag_acc": pytest.approx(1 / 3),
                                               "hellaswag_acc_norm": pytest.approx(2 / 3)}


def test_hellaswag_text_is_cleaned_as_lm_eval():
    doc = {"activity_label": "Pets", "ctx_a": "A man [header] walks.", "ctx_b": "he",
           "endings": ["sits [title] down."], "label": "0"}
    assert hellaswag_item(doc) == ("Pets: A man walks. He", ["sits. down."], 0)


def write_jsonl(path, records: list[dict]):
    """JSON Lines, compressed as the file name says (.xz, .gz) or plain."""
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return path


def test_hellaswag_ctx_form_compressed_scores_as_ctx_a_ctx_b(tmp_path, tokenizer):
    endings = ["cat", "elephant", "dog", "mouse"]
    split = [("A keeper feeds the animals.", "the zoo has a", "0"), ("A man [header] walks his dog.", "he", "2"),
             ("The zoo has an elephant.", "", "1")]  # Rowan/hellaswag's form: labels are strings, ctx_b lower case
    split_docs = [{"activity_label": "Zoo", "ctx_a": a, "ctx_b": b, "endings": endings, "label": label}
                  for a, b, label in split]
    # The other form keeps only ctx; built with ctx_b capitalised, it must give lm-eval's context exactly.
    joined_docs = [{"ind": i, "activity_label": "Zoo", "ctx": a + " " + b.capitalize(), "endings": endings,
                    "label": int(label)} for i, (a, b, label) in enumerate(split)]
    torch.manual_seed(0)  # a model that reads its input, so the contexts count
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1,
                                       n_head=2)).eval()
    reference, _ = load_benchmark("hellaswag", str(write_jsonl(tmp_path / "split.jsonl", split_docs)))
    expected = run_hellaswag(model, tokenizer, reference)
    for name in ("hellaswag_val.jsonl.xz", "hellaswag_val.jsonl.gz"):
        docs, description = load_benchmark("hellaswag", str(write_jsonl(tmp_path / name, joined_docs)))
        assert description["items"] == 3
        assert [hellaswag_item(d) for d in docs] == [hellaswag_item(d) for d in reference]
        assert run_hellaswag(model, tokenizer, docs) == expected


def test_hellaswag_record_of_neither_form_is_one_line_error(tmp_path):
    path = write_jsonl(tmp_path / "hs.jsonl.gz", [
        {"activity_label": "Zoo", "ctx": "The zoo has a", "endings": ["cat"], "label": 0},
        {"activity_label": "Zoo", "context": "The zoo has a", "endings": ["cat"], "label": 0}])
    with pytest.raises(UserError, match=r"record 2 of .*hs\.jsonl\.gz .*expected: activity_label, ctx_a, ctx_b, "
                                        r"endings, label; or activity_label, ctx, endings, label") as e:
        load_benchmark("hellaswag", str(path))
    assert "\n" not in str(e.value)


def test_wikitext_raw_file_is_split_into_articles_as_the_hub_dataset(tmp_path):
    articles = [" = Valkyria Chronicles = \n \n The game began development in 2010 . \n \n"
                " = = Gameplay = = \n \n Players take control of a squad . \n \n"
                " = = = Plot = = = \n \n The story follows Kurt . \n \n",
                " = Tower Building = \n \n The tower stands 40 m tall . \n \n",
                # a table's legend line starts with " = " but is no title
                " = Athletics at the Games = \n \n = National record \n \n"
                " = = Results = = \n \n Smith won in 10 @.@ 2 s . \n"]
    text = " \n" + "".join(articles)  # WikiText's files open with a blank line, which joins no page
    (tmp_path / "wiki.test.raw").write_text(text, encoding="utf-8")
    (tmp_path / "wiki.test.raw.xz").write_bytes(lzma.compress(text.encode("utf-8")))
    for name in ("wiki.test.raw", "wiki.test.raw.xz"):
        pages, description = load_benchmark("wikitext", str(tmp_path / name))
        # Each page runs from its title to the line before the next title; the newline between them goes.
        assert [p["page"] for p in pages] == [a[:-1] for a in articles[:-1]] + [articles[-1]]
        assert description["items"] == 3
    (tmp_path / "notes.txt").write_text(text, encoding="utf-8")  # any other text file is one page
    assert load_benchmark("wikitext", str(tmp_path / "notes.txt"))[0] == [{"page": text}]


def test_lambada_by_hand(unigram_dir):
    model, tok = load_model(str(unigram_dir))
    z = log_z(len(tok))
    k = len(tok.encode(" mice"))
    assert k > 1  # a word of several tokens, each at logit 0
    # " cat" is the argmax everywhere, so greedy decoding gets the first passage right, not the second;
    # the perplexity is per passage (exp of the mean loss of the two last words), not per token.
    scores = run_lambada(model, tok, [{"text": "the zoo has a cat"}, {"text": "the zoo has two mice"}])
    assert scores["lambada_acc"] == 0.5
    assert scores["lambada_ppl"] == pytest.approx(math.exp(((z - 2) + k * z) / 2), rel=1e-5)


def test_wikitext_word_perplexity_by_hand(uniform_dir, tokenizer):
    page = " = = The zoo = = \n The zoo has a cat , a dog ( old ) and 2 @-@ 3 elephants . \n"
    assert wikitext_detokenize(page) == " == The zoo ==\nThe zoo has a cat, a dog (old) and 2-3 elephants.\n"
    model, tok = load_model(str(uniform_dir))
    words = len(re.split(r"\s+", page))  # lm-eval counts the words of the page before detokenizing
    n_tokens = len(tok.encode(wikitext_detokenize(page)))
    scores = run_wikitext(model, tok, [{"page": page}])
    assert scores["wikitext_word_ppl"] == pytest.approx(math.exp(n_tokens * math.log(len(tok)) / words), rel=1e-5)


def test_greedy_samples(unigram_dir):
    model, tok = load_model(str(unigram_dir))
    texts, speed = samples_and_speed(model, tok, ["the zoo has", "a"], max_new_tokens=3)
    assert texts == [" cat cat cat"] * 2 and speed > 0


def test_peft_adapter_is_loaded_on_its_base(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    # init_lora_weights=False: random A and B, so the adapter changes the outputs.
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir),
                                LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                           init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")  # no tokenizer in it: the base's is used
    ids = torch.tensor([tokenizer.encode("the zoo has a cat")])
    model, tok = load_model(str(tmp_path / "adapter"))
    base, _ = load_model(str(base_dir))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft_model(input_ids=ids).logits)
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)
    assert tok.get_vocab() == tokenizer.get_vocab()


def test_an_adapter_whose_base_folder_moved_says_so(tmp_path, tokenizer):
    """Not PEFT's "Repo id must be in the form ...": the base the adapter names is the folder that is missing."""
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir),
                   LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(tmp_path / "adapter")
    base_dir.rename(tmp_path / "moved")
    for load in (load_model, load_tokenizer):  # an adapter saved without a tokenizer reads its base's
        with pytest.raises(UserError) as error:
            load(str(tmp_path / "adapter"))
        what = "model" if load is load_model else "tokenizer"
        assert str(error.value) == (f"{what} '{tmp_path / 'adapter'}' could not be loaded: its base model folder "
                                    f"{base_dir} (base_model_name_or_path in its adapter_config.json) is missing; "
                                    "put the base back there, or write where it is now into adapter_config.json")


def test_a_run_folder_that_is_not_there_is_no_such_folder_not_a_hub_failure():
    """runs/nope has the shape of a Hub id (owner/name), but runs/ is where runs go: no such folder, said at once."""
    result = run_script("scripts/generate.py", "runs/nope", "--prompt", "x", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: model 'runs/nope' could not be loaded: no such folder"


def test_load_model_errors_are_one_line(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(UserError, match=r"did you mean .*final") as e:
        load_model(str(tmp_path / "run"))
    assert "\n" not in str(e.value)
    # A path that is not there is not taken for a malformed Hub id (scripts/generate.py, compare.py).
    with pytest.raises(UserError, match=r"'.*nope' could not be loaded: no such folder$"):
        load_model(str(tmp_path / "nope"))
    # A folder of something else says what it lacks, whole (not the first line of a tokenizer's long message).
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("text")
    with pytest.raises(UserError, match=r"the folder has none of config.json, adapter_config.json$"):
        load_model(str(tmp_path / "notes"))
    with pytest.raises(UserError, match=r"the folder has none of tokenizer.json, tokenizer_config.json, vocab.json$"):
        load_tokenizer(str(tmp_path / "notes"))


def test_a_tokenizer_larger_than_the_embeddings_is_one_line(tmp_path, tokenizer):
    """generate.py, compare.py and SFT load through load_model: an id past the embedding table would be an
    IndexError inside the first forward."""
    folder = save_model(tmp_path / "model", tokenizer)
    larger = load_tokenizer(str(folder))
    larger.add_tokens([f"<extra_{i}>" for i in range(40)])
    larger.save_pretrained(folder)
    with pytest.raises(UserError) as error:
        load_model(str(folder))
    assert str(error.value) == (f"model '{folder}': its tokenizer has {len(tokenizer) + 40:,} tokens, more than the "
                                f"model's {len(tokenizer):,} embeddings; put the tokenizer the model was trained with "
                                "in its folder")


@pytest.mark.parametrize("where, message", [
    ("a file", "FOLDER/taken is a file, not a folder; choose another --output_dir"),
    pytest.param("read-only", "cannot write in /sys/kernel (Permission denied); choose another --output_dir",
                 marks=pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="a folder nobody may write in, "
                                          "root included")),
])
def test_compare_checks_its_output_dir_before_scoring(tmp_path, uniform_dir, monkeypatch, where, message):
    """Not after scoring every model, when the results would be lost."""
    import hf_gpt.compare as compare_module

    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" / "report" if where == "a file" else Path("/sys/kernel/report")
    scored = []
    monkeypatch.setattr(compare_module, "evaluate_model", lambda *a, **k: scored.append(a))
    with pytest.raises(UserError) as error:
        compare_module.compare([str(uniform_dir)], None, out, device="cpu", dtype=torch.float32, batch_size=2)
    assert str(error.value) == f"--output_dir {out}: " + message.replace("FOLDER", str(tmp_path))
    assert not scored


@pytest.mark.parametrize("script, args, message", [
    ("compare.py", ["MODEL", "--limit", "0"], "--limit must be 1 or more (leave it out for every item), not 0"),
    ("generate.py", ["MODEL", "--prompt", "x", "--temperature", "0"], "--temperature must be a number above 0, not 0.0"),
    ("generate.py", ["MODEL", "--prompt", "x", "--temperature", "nan"], "--temperature must be a number above 0, not nan"),
])
def test_script_values_are_refused_before_loading(uniform_dir, script, args, message):
    result = run_script(f"scripts/{script}", *[str(uniform_dir) if a == "MODEL" else a for a in args], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")


def test_auto_tasks_follow_the_files_given():
    assert resolve_tasks("auto", {"text": "held_out.txt"}) == ["text", "generate"]
    assert resolve_tasks("auto", {}) == ["text", "hellaswag", "lambada", "wikitext", "generate"]
    assert resolve_tasks("lambada,text", {}) == ["text", "lambada"]
    with pytest.raises(UserError, match="mmlu"):
        resolve_tasks("mmlu", {})


def test_compare_script_end_to_end(tmp_path, uniform_dir, unigram_dir, tokenizer):
    (tmp_path / "held_out.txt").write_text(HELD_OUT, encoding="utf-8")
    endings = ["cat", "elephant", "dog", "mouse"]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(
        {"activity_label": "Zoo", "ctx_a": "the zoo has a", "ctx_b": "", "endings": endings, "label": label}) + "\n"
        for label in ("1", "1", "0")))
    (tmp_path / "lambada.jsonl").write_text('{"text": "the zoo has a cat"}\n{"text": "the zoo has a dog"}\n')
    (tmp_path / "prompts.txt").write_text("the zoo has\n")
    out = tmp_path / "report"
    result = run_script("scripts/compare.py", str(uniform_dir), str(unigram_dir),
                        "--dataset", str(tmp_path / "held_out.txt"), "--hellaswag", str(tmp_path / "hs.jsonl"),
                        "--lambada", str(tmp_path / "lambada.jsonl"),
                        "--limit", "2", "--prompts", str(tmp_path / "prompts.txt"), "--max_new_tokens", "2",
                        "--output_dir", str(out))
    report = json.loads((out / "results.json").read_text())
    assert list(report["models"]) == [str(uniform_dir), str(unigram_dir)]  # names as given
    vocab = len(tokenizer)
    uniform, unigram = report["models"][str(uniform_dir)], report["models"][str(unigram_dir)]
    assert set(uniform) == {"val_loss", "val_ppl", "val_bpb", "hellaswag_acc", "hellaswag_acc_norm",
                            "lambada_acc", "lambada_ppl", "tokens_per_s_generate"}  # no --wikitext: not run
    assert uniform["val_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert unigram["hellaswag_acc"] == 0.0 and unigram["hellaswag_acc_norm"] == 1.0  # --limit 2: the third left out
    assert unigram["lambada_acc"] == 0.5 and uniform["lambada_acc"] == 0.0
    assert report["data"]["tasks"]["hellaswag"] == {"file": str(tmp_path / "hs.jsonl"), "items": 2}
    # Greedy: the uniform model's argmax is the first id, <|endoftext|>, so it stops at once.
    assert report["samples"] == [{"prompt": "the zoo has",
                                  "continuations": {str(uniform_dir): "", str(unigram_dir): " cat cat"}}]
    assert set(report["versions"]) >= {"torch", "transformers", "datasets", "evaluate", "peft"}
    markdown = (out / "report.md").read_text()
    assert "| HellaSwag acc_norm | ↑ |" in markdown and f"| `{unigram_dir}` | cat cat |" in markdown
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "HellaSwag acc" in result.stdout and str(out) in result.stdout


def test_unreachable_hub_dataset_is_one_line_and_exit_2(tmp_path, uniform_dir):
    result = run_script("scripts/compare.py", str(uniform_dir), "--tasks", "hellaswag", "--output_dir", str(tmp_path),
                        check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: HellaSwag: the Hub dataset Rowan/hellaswag") and "--hellaswag FILE.jsonl" in error
    assert not (tmp_path / "results.json").exists()
