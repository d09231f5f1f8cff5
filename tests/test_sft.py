import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

from conftest import ROOT, run_script
from hf_gpt.config import UserError
from hf_gpt.engine import model_inputs, target_count
from hf_gpt.generation import chat_prompt_ids, generate
from hf_gpt.loading import load_model, load_tokenizer
from hf_gpt.model import causal_lm_loss
from hf_gpt.scoring import JUDGE_PROMPT, judge_score, rouge_l
from hf_gpt.sft import (ALPACA_TEMPLATE, SFTConfig, SFTData, check_config, collate, encode_chat, pack, read_records,
                        resolve_chat_template, split_records, to_messages, with_chat_template)

RECORDS = ROOT / "tests" / "data" / "instructions.json"
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
CHATS = [  # Alpaca with and without input, a system message, two turns
    [{"role": "user", "content": "Rewrite the sentence in the past tense.", "input": "She walks to the market."},
     {"role": "assistant", "content": "She walked to the market."}],
    [{"role": "user", "content": "Name a yellow fruit."}, {"role": "assistant", "content": "A banana."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Peru?"},
     {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And of Chile?"},
     {"role": "assistant", "content": "Santiago."}],
]


@pytest.fixture(scope="module")
def base_model(tokenizer_dir, tmp_path_factory) -> Path:
    """A GPT-2 of 2 layers x 32 wide with random weights and a 512-token BPE that, like GPT-2's, has no pad token.
    The weights are spread wider than GPT-2's initialisation, so that greedy replies are varied text
    rather than one token repeated."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=256, n_layer=2, n_head=2, n_embd=32, bos_token_id=0,
                               eos_token_id=0, initializer_range=0.2)).save_pretrained(folder)
    load_tokenizer(str(tokenizer_dir)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(base_model):
    return with_chat_template(load_tokenizer(str(base_model)), ALPACA_TEMPLATE)


@pytest.fixture(scope="module")
def chat_model(base_model, tokenizer, tmp_path_factory) -> Path:
    """The base model saved with the chat template, as final/ is."""
    folder = tmp_path_factory.mktemp("chat_model")
    AutoModelForCausalLM.from_pretrained(base_model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sft_config(base_model, **overrides) -> SFTConfig:
    return SFTConfig(model=str(base_model), dataset=str(RECORDS), **{"micro_batch_size": 4, **overrides})


def test_alpaca_template_writes_the_articles_prompt(tokenizer):
    record = {"instruction": "Convert 45 kilometers to meters.", "input": "", "output": "45000 meters."}
    text = tokenizer.apply_chat_template(to_messages(record, "r"), tokenize=False)
    assert text == (f"{PREAMBLE}\n\n### Instruction:\nConvert 45 kilometers to meters.\n\n"
                    "### Response:\n45000 meters.<|endoftext|>")
    record["input"] = "45 km"
    prompt = tokenizer.apply_chat_template(to_messages(record, "r")[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == (f"{PREAMBLE}\n\n### Instruction:\nConvert 45 kilometers to meters.\n\n"
                      "### Input:\n45 km\n\n### Response:\n")


def test_training_prompt_equals_apply_chat_template_pipeline_and_generate_py(tokenizer, chat_model):
    saved = AutoTokenizer.from_pretrained(chat_model)  # what final/ gives a user
    pipe = pipeline("text-generation", model=str(chat_model))
    for chat in CHATS:
        example = encode_chat(tokenizer, chat, "test")
        reply_start = len(example.labels)
        while example.labels[reply_start - 1] != -100:  # back over the last reply's targets
            reply_start -= 1
        trained_prompt = example.input_ids[:reply_start]
        applied = saved.apply_chat_template(chat[:-1], add_generation_prompt=True)["input_ids"]
        piped = pipe(chat[:-1], max_new_tokens=1, do_sample=False, return_tensors=True)[0]["generated_token_ids"][:-1]
        assert trained_prompt == applied == piped == chat_prompt_ids(saved, chat[:-1])

    # scripts/generate.py answers a chat message as the pipeline does, token for token.
    message = [{"role": "user", "content": "Name a yellow fruit."}]
    expected = pipe(message, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    out = run_script("scripts/generate.py", str(chat_model), "--chat", "--prompt", message[0]["content"],
                     "--greedy", "--max_new_tokens", "12")
    assert expected.strip() and out.stdout.strip() == expected.strip()


def test_generation_loads_a_peft_adapter_with_its_base_models_tokenizer(chat_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(chat_model)
    get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(adapter)
    model, tokenizer = load_model(str(adapter))
    assert type(model).__name__ == "PeftModelForCausalLM" and tokenizer.chat_template == ALPACA_TEMPLATE
    plain, _ = load_model(str(chat_model))
    prompt = [chat_prompt_ids(tokenizer, CHATS[1][:1])]
    # A fresh LoRA adapter adds zero (its B matrix starts at 0): the replies are the base model's.
    assert generate(model, tokenizer, prompt, max_new_tokens=6) == generate(plain, tokenizer, prompt, max_new_tokens=6)


def test_batched_generation_equals_one_prompt_at_a_time(chat_model):
    model, tokenizer = load_model(str(chat_model))
    prompts = [chat_prompt_ids(tokenizer, chat[:-1]) for chat in CHATS]  # three lengths: left padding differs
    alone = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3) == alone
    assert len(set(alone)) == 3


def test_max_new_tokens_below_one_is_refused_not_blamed_on_the_prompt(chat_model):
    out = run_script("scripts/generate.py", str(chat_model), "--prompt", "hi", "--max_new_tokens", "-1", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: --max_new_tokens must be 1 or more, not -1"
    model, tokenizer = load_model(str(chat_model))  # every other caller of generate (compare.py, SFT's replies)
    with pytest.raises(UserError, match=r"^max_new_tokens must be 1 or more, not 0$"):
        generate(model, tokenizer, ["hi"], max_new_tokens=0)


def test_loss_is_on_the_reply_and_its_end_token_only(tokenizer, base_model):
    examples = [encode_chat(tokenizer, chat, "test") for chat in CHATS]
    for chat, ex in zip(CHATS, examples):  # every reply of a chat is learnt, each with its end token
        targets = [t for t in ex.labels if t != -100]
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        assert tokenizer.decode(targets) == "".join(r + tokenizer.eos_token for r in replies)
        last = len(tokenizer(replies[-1] + tokenizer.eos_token)["input_ids"])
        assert ex.labels[-last:] == ex.input_ids[-last:]  # the last reply ends the example
    examples = examples[:2]
    batch = collate([[ex] for ex in examples], tokenizer.pad_token_id, packing=False)
    lengths = torch.tensor([len(ex.input_ids) for ex in examples])
    real = torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]
    short = int(lengths.argmin())
    pad = ~real[short]
    assert pad.any() and (batch["labels"][short][pad] == -100).all()
    assert (batch["input_ids"][short][pad] == tokenizer.eos_token_id).all()  # GPT-2 pads with end-of-text

    # The batch carries no attention mask (right padding: causal attention never sees it); its loss
    # equals the loss of logits computed with an explicit padding mask.
    assert "attention_mask" not in batch
    model = AutoModelForCausalLM.from_pretrained(base_model).eval()
    with torch.no_grad():
        loss = causal_lm_loss(model, batch, target_count(batch), fused=False)
        logits = model(input_ids=batch["input_ids"], attention_mask=real.long()).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][mask], targets[mask])
    torch.testing.assert_close(loss, by_hand)

    # Whatever the model predicts at prompt and padding positions leaves the loss unchanged.
    def loss_of(some_logits):
        return model.loss_function(some_logits, batch["labels"], vocab_size=model.config.vocab_size)

    noise = torch.randn_like(logits) * 10
    at_prompt = torch.zeros_like(batch["labels"], dtype=torch.bool)
    at_prompt[:, :-1] = ~mask
    torch.testing.assert_close(loss_of(logits + noise * at_prompt[..., None]), by_hand)
    assert not torch.allclose(loss_of(logits + noise * ~at_prompt[..., None]), by_hand)  # replies do count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_see_each_other(tokenizer, base_model, attn):
    model = AutoModelForCausalLM.from_pretrained(base_model, attn_implementation=attn).eval()
    a, b = (encode_chat(tokenizer, chat, "test") for chat in CHATS[:2])
    [row] = pack([a, b], max_length=len(a.input_ids) + len(b.input_ids) + 5)
    packed = collate([row], tokenizer.pad_token_id, packing=True)
    assert packed["position_ids"][0].tolist() == [*range(len(a.input_ids)), *range(len(b.input_ids))]
    with torch.no_grad():
        inputs = model_inputs({k: v for k, v in packed.items() if k != "labels"}, torch.device("cpu"), attn)
        together = model(**inputs).logits[0]
        alone = [model(input_ids=torch.tensor([ex.input_ids])).logits[0] for ex in (a, b)]
        loss_packed = causal_lm_loss(model, model_inputs(packed, torch.device("cpu"), attn), 1, fused=False)
        loss_alone = sum(causal_lm_loss(model, collate([[ex]], tokenizer.pad_token_id, False), 1, fused=False)
                         for ex in (a, b))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_packed, loss_alone)


def test_packing_fills_rows_without_exceeding_max_length(tokenizer):
    examples = [encode_chat(tokenizer, to_messages(r, "r"), "r") for _, r in read_records(str(RECORDS))]
    rows = pack(examples, max_length=1024)
    assert sorted(id(ex) for row in rows for ex in row) == sorted(id(ex) for ex in examples)
    assert all(sum(len(ex.input_ids) for ex in row) <= 1024 for row in rows)
    assert len(rows) == math.ceil(sum(len(ex.input_ids) for ex in examples) / 1024)  # no row wasted


@pytest.mark.parametrize("content, problem", [
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}]',
     "bad.json: record 3: 'output' is missing"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "  "}]',
     "bad.json: record 2: 'output' is empty"),
    ('[{"instruction": "a", "output": "b"}, {"question": "c", "answer": "d"}]',
     "bad.json: record 2: expected instruction/output, prompt/completion or messages fields; found question, answer"),
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     "bad.json: not valid JSON (line 2, column"),
])
def test_malformed_json_names_the_file_and_record(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError) as error:
        [to_messages(record, where) for where, record in read_records(str(path))]
    assert str(error.value).startswith(str(tmp_path)) and problem in str(error.value)


@pytest.mark.parametrize("lines, problem", [
    (['{"prompt": "p", "completion": "c"}', '', '{"prompt": "p", "completion": 3}'],
     "bad.jsonl: record 2 (line 3): 'completion' must be a string, found int"),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
      '{"messages": [{"role": "user", "content": "hi"}]}'],
     "bad.jsonl: record 2 (line 2): the last message must be the assistant's reply"),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}'],
     "bad.jsonl: record 1 (line 1): message 2 needs a role of system, user or assistant"),
    (['{"prompt": "p", "completion": "c"}', '{"prompt": "p", '], "bad.jsonl: record 2 (line 2): not valid JSON"),
])
def test_malformed_jsonl_names_the_file_and_record(tmp_path, lines, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as error:
        [to_messages(record, where) for where, record in read_records(str(path))]
    assert problem in str(error.value)


@pytest.mark.parametrize("name", ["data.bin", "data.jsonl", "data"])
def test_a_binary_file_cannot_be_read_as_json_not_that_it_was_not_found(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError) as error:
        read_records(str(path))
    assert str(error.value) == (f"{path}: cannot be read as JSON or text: not UTF-8 (byte 128; a binary file?); "
                                "give JSON or JSON Lines records, or a .csv or .parquet file of them")


def test_every_record_kind_becomes_a_chat(tmp_path, tokenizer):
    path = tmp_path / "mixed.json"  # JSON lines under a .json name, as datasets' to_json writes them
    path.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Name a yellow fruit.", "input": "", "output": "A banana."},
        {"prompt": "Name a yellow fruit.", "completion": "A banana."},
        {"messages": [{"role": "user", "content": "Name a yellow fruit."},
                      {"role": "assistant", "content": " A banana.\n"}]},
    ]))
    ids = {tuple(encode_chat(tokenizer, to_messages(r, w), w).input_ids) for w, r in read_records(str(path))}
    assert len(ids) == 1  # the same chat, whichever way it was written (text is stripped)


def test_a_dataset_folder_or_hub_id_loads_through_datasets(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "alpaca"
    folder.mkdir()
    records = json.loads(RECORDS.read_text())[:5]
    Dataset.from_list(records).to_parquet(str(folder / "train.parquet"))
    loaded = read_records(str(folder))
    assert [r for _, r in loaded] == records and loaded[4][0] == f"{folder} (train): record 5"
    with pytest.raises(UserError, match="dataset 'someone/not-reachable' could not be loaded"):
        read_records("someone/not-reachable")


def test_a_custom_template_must_mark_the_replies(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="no {% generation %} block"):
        resolve_chat_template(str(template))


def test_rouge_l_is_the_longest_common_word_subsequence():
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat") == 1
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)  # P = R = 5/6
    assert rouge_l("Jupiter.", "Saturn.") == 0


def test_bad_data_stops_the_script_with_one_line(base_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ["d"]}\n')
    result = run_script("scripts/sft.py", "--model", str(base_model), "--dataset", str(data), "--output_dir",
                        str(tmp_path / "run"), "--mixed_precision", "no", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: {data}: record 2 (line 2): 'output' must be a string, found list"
    assert "Traceback" not in result.stderr


def test_a_folder_without_a_model_is_named_as_the_model(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserError, match=r"^model '.*notes' could not be loaded: the folder has none of config.json"):
        check_config(SFTConfig(model=str(tmp_path / "notes"), dataset=str(RECORDS)))


def test_a_missing_rouge_package_stops_before_training(base_model, tmp_path, monkeypatch):
    from hf_gpt.recipes import run_sft

    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import rouge_score now raises ImportError
    with pytest.raises(UserError, match=r"^the test replies are scored with ROUGE-L, which needs the rouge-score"):
        run_sft(SFTConfig(model=str(base_model), dataset=str(RECORDS), output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # stopped before the run's folder was made


def test_overlong_records_are_truncated_or_dropped_and_counted(tokenizer, base_model):
    lengths = [len(encode_chat(tokenizer, to_messages(r, w), w).input_ids) for w, r in read_records(str(RECORDS))]
    limit = sorted(lengths)[len(lengths) // 2]
    over = sum(n > limit for n in lengths[:36])  # the 36 training records
    assert over > 3

    truncated = SFTData(sft_config(base_model, max_length=limit, overlong="truncate"), tokenizer, 256)
    assert truncated.counts["train_truncated"] + truncated.counts["train_dropped"] == over
    assert truncated.counts["train"] == 36 - truncated.counts["train_dropped"]
    assert max(len(ex.input_ids) for ex in truncated.train) == limit
    assert all(any(t != -100 for t in ex.labels[1:]) for ex in truncated.train)
    assert f"truncated to {limit} tokens" in truncated.summary()

    dropped = SFTData(sft_config(base_model, max_length=limit, overlong="drop"), tokenizer, 256)
    assert dropped.counts["train_dropped"] == over and dropped.counts["train"] == 36 - over
    assert f"{over} dropped (overlong: drop)" in dropped.summary()


def test_split_is_the_articles_and_deterministic():
    records = list(range(1100))
    train, val, test = split_records(records, 0.05, 0.10)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == records[:935] and test == records[935:1045] and val == records[1045:]
    shuffled = split_records(records, 0.05, 0.10, seed=7)
    assert shuffled == split_records(records, 0.05, 0.10, seed=7) and shuffled[0] != train
    assert sorted(shuffled[0] + shuffled[1] + shuffled[2]) == records


def test_batches_resume_exactly_and_processes_take_disjoint_shares(tokenizer, base_model):
    data = SFTData(sft_config(base_model, micro_batch_size=3), tokenizer, 256)
    assert data.counts["train"] == 36 and data.steps_per_epoch(1, 1) == 12

    def take(batches, n):
        return [b["input_ids"].tolist() for b in (next(batches) for _ in range(n))]

    batches = data.train_batches(0, 1)
    take(batches, 10)
    state = batches.state_dict()
    expected = take(batches, 8)  # crosses into the second epoch
    resumed = data.train_batches(0, 1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as saved in a checkpoint
    assert take(resumed, 8) == expected
    with pytest.raises(UserError, match="resume with --seed 1337"):
        other_seed = SFTData(sft_config(base_model, micro_batch_size=3, seed=5), tokenizer, 256)
        other_seed.train_batches(0, 1).load_state_dict(state)

    def epoch_rows(rank, world, epoch):
        b = data.train_batches(rank, world)
        b.load_state_dict({"epoch": epoch, "position": 0, "seed": data.cfg.seed})
        return {tuple(t for t in row if t != tokenizer.pad_token_id)
                for batch in take(b, b.batches_per_epoch()) for row in batch}

    first, second = epoch_rows(0, 2, 0), epoch_rows(1, 2, 0)
    assert len(first) == len(second) == 18 and not first & second
    assert epoch_rows(0, 2, 1) != first  # every epoch reshuffles
    assert len(data.eval_batches(0, 2)) == len(data.eval_batches(1, 2))


class JudgeServer:
    """A stand-in for an Ollama/vLLM server on 127.0.0.1: POST /v1/chat/completions answers `reply`
    and keeps the request. It serves at most `limit` requests within `seconds`, then stops by itself."""

    def __init__(self, reply: str, limit: int = 20, seconds: float = 120):
        self.reply, self.requests = reply, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                message = {"role": "assistant", "content": server.reply}
                answer = json.dumps({"choices": [{"index": 0, "message": message}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 0.2  # handle_request waits at most this long, so the loop sees `stop` soon
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.stop = threading.Event()
        deadline = time.time() + seconds
        self.thread = threading.Thread(target=self._serve, args=(limit, deadline), daemon=True)
        self.thread.start()

    def _serve(self, limit, deadline):
        while len(self.requests) < limit and time.time() < deadline and not self.stop.is_set():
            self.httpd.handle_request()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.httpd.server_close()


@pytest.fixture
def judge():
    servers = []

    def start(reply, **kwargs):
        servers.append(JudgeServer(reply, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_judge_scores_on_the_articles_scale(judge):
    server = judge("Score: 87")
    assert judge_score(server.url, "llama3", "Name a fruit.", "A banana.", "An apple.") == 87
    path, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "llama3" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": JUDGE_PROMPT.format(
        instruction="Name a fruit.", output="A banana.", response="An apple.")}]
    assert "score the model response `An apple.` on a scale from 0 to 100" in body["messages"][0]["content"]
    assert judge_score(judge("I cannot tell.").url, "m", "i", "o", "r") is None
    url = server.url
    server.close()
    with pytest.raises(UserError, match="judge http://127.0.0.1"):
        judge_score(url, "m", "i", "o", "r", timeout=5)


def test_sft_script_end_to_end(base_model, tmp_path, judge):
    server = judge("90")
    out = tmp_path / "sft"
    result = run_script("scripts/sft.py", "--model", str(base_model), "--dataset", str(RECORDS), "--output_dir", str(out),
                        "--micro_batch_size", "6", "--epochs", "2", "--learning_rate", "3e-3",
                        "--mixed_precision", "no", "--max_new_tokens", "12", "--log_every", "1",
                        "--judge_url", server.url, "--judge_model", "stand-in")
    assert "42 records: 36 train, 2 validation, 4 test" in result.stdout
    # Validation after each epoch (6 steps of 6 records), the last at the end.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]

    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == ALPACA_TEMPLATE and tokenizer.pad_token == tokenizer.eos_token
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id

    replies = [json.loads(line) for line in (out / "test_responses.jsonl").read_text().splitlines()]
    test_records = json.loads(RECORDS.read_text())[36:40]  # file order: 36 train, then 4 test
    assert [r["reference"] for r in replies] == [t["output"] for t in test_records]
    assert replies[0]["prompt"].startswith(PREAMBLE) and test_records[0]["instruction"] in replies[0]["prompt"]
    assert all(0 <= r["rougeL"] <= 1 and r["judge_score"] == 90 for r in replies)
    # The base model answered the first prompts too, greedy through the same template: before beside after.
    base = AutoModelForCausalLM.from_pretrained(base_model)
    user = {"role": "user", "content": test_records[0]["instruction"], "input": test_records[0]["input"]}
    prompt = torch.tensor([tokenizer.apply_chat_template([user], add_generation_prompt=True)["input_ids"]])
    expected = base.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert replies[0]["base_response"] == tokenizer.decode(expected[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    assert ["base_response" in r for r in replies] == [True] * 4  # base_replies 5 > 4 test records
    assert len(server.requests) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "sft" and summary["eval"]["val_loss"] > 0 and summary["steps"] == 12
    saved = yaml.safe_load((out / "config.yaml").read_text())  # as given: the length came from epochs, not from it
    assert saved["max_steps"] == 0 and saved["eval_every"] == 0 and saved["epochs"] == 2
    assert summary["test"]["judge_score"] == 90 and summary["test"]["test_records"] == 4
    assert summary["test"]["rougeL"] == pytest.approx(sum(r["rougeL"] for r in replies) / 4)

    # Replies scored later, where a judge can be reached: scripts/score.py.
    later = judge("42")
    run_script("scripts/score.py", str(out / "test_responses.jsonl"), "--judge_url", later.url, "--judge_model", "m")
    assert json.loads((out / "summary.json").read_text())["test"]["judge_score"] == 42
