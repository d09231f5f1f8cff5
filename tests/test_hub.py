"""Publishing on the Hub: scripts/push_to_hub.py run as a user runs it (a fresh interpreter, the real
huggingface_hub client) against tests/hub_server.py, a stand-in of the Hub's HTTP API on loopback that
HF_ENDPOINT points to. What arrived there is compared with the folder byte for byte."""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_gpt.config import UserError
from hf_gpt.hub import prepare_folder, read_folder, results_row
from conftest import assert_losses_match, assert_weights_match
from hub_server import FINEWEB_EDU_README, HubStandIn, Repo, fineweb_edu_parquet, hub_env

ROOT = Path(__file__).resolve().parent.parent
# Tokens shaped like real ones, so that a leak anywhere would be found by a plain search.
TOKEN = "hf_StandInWriteTokenAbCdEfGhIjKlMnOpQrStUv"
READ_TOKEN = "hf_StandInReadOnlyTokenAbCdEfGhIjKlMnOpQr"
USERS = {TOKEN: {"name": "me", "role": "write"}, READ_TOKEN: {"name": "me", "role": "read"}}
PERSONAL = ["alice", "journal", "Dear diary", "my secret"]  # the LoRA run's writing: must never leave the machine


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A pretraining run (final/), a LoRA run on "personal writing" (adapter/) and a compare.py results.json,
    laid out as the engine and scripts/compare.py write them; tiny models, made here, offline."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_gpt.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("runs")
    tokenizer = train_bpe(["The quick brown fox jumps over the lazy dog. Once upon a time, a model learnt."] * 8,
                          vocab_size=300, max_documents=8)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer),
                                       bos_token_id=0, eos_token_id=0))
    final = root / "tiny" / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (root / "tiny" / "summary.json").write_text(json.dumps({
        "recipe": "pretrain", "base_model": None, "datasets": ["HuggingFaceFW/fineweb-edu"], "steps": 120,
        "tokens": 123_456, "tokens_per_step": 1_024, "wall_time_s": 3_725.0, "hardware": "1 x NVIDIA H100",
        "num_processes": 1, "mixed_precision": "bf16", "eval": {"val_loss": 3.5, "val_ppl": 33.1, "val_bpb": 1.2},
        "versions": {"torch": "2.13.0", "transformers": "5.23.0"}}))
    (root / "tiny" / "config.yaml").write_text(
        "dataset: HuggingFaceFW/fineweb-edu\nmax_steps: 120\nsample_prompts: ['Once upon a time']\n"
        "judge_api_key: sk-judge-secret-123\n")
    (root / "results.json").write_text(json.dumps({
        "models": {str(final): {"val_loss": 3.4, "val_ppl": 29.96, "val_bpb": 1.18, "hellaswag_acc_norm": 0.3012,
                                "lambada_acc": 0.25, "tokens_per_s_generate": 812.0},
                   "openai-community/gpt2": {"val_ppl": 21.0}},
        "data": {"tasks": {"text": {"source": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "split": "train",
                                    "holdout": 0.0005, "documents": 100},
                           "hellaswag": {"source": "Rowan/hellaswag", "config": None, "split": "validation",
                                         "items": 10042},
                           "lambada": {"file": "/data/lambada.jsonl", "items": 5153}}, "limit": None}}))

    base = root / "base"  # the LoRA run's base model, on this machine only
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                            task_type="CAUSAL_LM"))
    lora.peft_config["default"].base_model_name_or_path = str(base)
    adapter = root / "me" / "adapter"
    lora.save_pretrained(adapter)  # also leaves PEFT's own template README.md, which the card replaces
    tokenizer.save_pretrained(adapter)
    (adapter / "samples.txt").write_text("Dear diary, my secret is that alice keeps a journal.\n")
    (root / "me" / "summary.json").write_text(json.dumps({
        "recipe": "lora", "base_model": str(base), "datasets": ["/home/alice/journal"], "steps": 40, "tokens": 20_480,
        "writing": {"files_read": 12, "documents": 11, "skipped": {"binary": 1}, "train_documents": 10,
                    "heldout_documents": 1},
        "wall_time_s": 95.0, "hardware": "CPU (x86_64, 2 cores)", "num_processes": 1, "mixed_precision": "no",
        "eval": {"val_loss": 2.75, "val_ppl": 15.64, "val_bpb": 0.97}}))
    (root / "me" / "config.yaml").write_text(
        "writing: /home/alice/journal\nsample_prompts: ['Dear diary, my secret']\nlora_r: 2\nmax_steps: 40\n")
    return {"root": root, "final": final, "base": base, "adapter": adapter, "results": root / "results.json"}


@pytest.fixture
def hub():
    with HubStandIn(USERS) as server:
        yield server
    assert server.unhandled == [], f"the client called endpoints the stand-in lacks: {server.unhandled}"


def push(endpoint: str, *args, token: str | None = TOKEN, home: Path) -> subprocess.CompletedProcess:
    """scripts/push_to_hub.py in a fresh interpreter, configured only through the environment, as a user's.
    HF_HUB_DISABLE_XET: huggingface_hub uploads through Xet whenever hf_xet is installed; the stand-in
    speaks the regular protocol (preupload, LFS batch, PUT, commit)."""
    return subprocess.run([sys.executable, "scripts/push_to_hub.py", *map(str, args)], cwd=ROOT,
                          env=hub_env(endpoint, home, token), capture_output=True, text=True, timeout=120)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def local_files(folder: Path, names=None) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and (names is None or p.name in names)}


def card_of(files: dict[str, bytes]) -> tuple[ModelCard, dict]:
    card = ModelCard(files["README.md"].decode())
    return card, card.data.to_dict()


def run_card_code(card: ModelCard, local: dict[str, Path]) -> None:
    """The card's "How to use" code, exactly, with each Hub id pointed at the local folder it stands for."""
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    for repo_id, path in local.items():
        assert f'"{repo_id}"' in code
        code = code.replace(f'"{repo_id}"', json.dumps(str(path)))
    exec(compile(code, "model card", "exec"), {})


def assert_no_token(*outputs: str, folders: list[Path]) -> None:
    for text in outputs:
        assert TOKEN not in text and READ_TOKEN not in text
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


def test_model_arrives_byte_for_byte_with_its_card(runs, hub, tmp_path, capsys):
    result = push(hub.url, runs["final"], "--repo", "me/tiny-gpt2", "--results", runs["results"], home=tmp_path)
    out = ok(result)
    assert f"published: {hub.url}/me/tiny-gpt2" in out
    repo = hub.repos["me/tiny-gpt2"]
    remote = hub.files("me/tiny-gpt2")
    assert remote.pop(".gitattributes")  # made by the Hub with the repo
    assert remote == local_files(runs["final"])  # every file, README.md included, byte for byte
    assert "model.safetensors" in repo.lfs_paths and "config.json" not in repo.lfs_paths  # weights went through LFS
    assert hub.created == [{"name": "tiny-gpt2", "organization": "me"}]  # no visibility asked: the Hub's default
    assert not repo.private and len(repo.commits) == 1
    assert ("POST", "/api/validate-yaml") in hub.requests  # the client had the Hub check the card's metadata

    card, meta = card_of(remote)
    assert (meta["library_name"], meta["license"], meta["language"], meta["pipeline_tag"]) == (
        "transformers", "mit", ["en"], "text-generation")
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"] and "base_model" not in meta
    assert {"hf-gpt", "gpt2", "pretrained-from-scratch"} <= set(meta["tags"])
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    # compare.py's row for this folder; its held-out numbers replace the run's own (33.1 is not there).
    assert results == {("HuggingFaceFW/fineweb-edu", "loss"): 3.4, ("HuggingFaceFW/fineweb-edu", "perplexity"): 29.96,
                       ("HuggingFaceFW/fineweb-edu", "bits_per_byte"): 1.18, ("Rowan/hellaswag", "acc_norm"): 0.3012,
                       ("local/lambada", "accuracy"): 0.25}
    assert "/data/lambada.jsonl" not in card.text and "sk-judge-secret-123" not in card.text
    for fact in ("| tokens | 123,456 |", "| optimizer steps | 120 |", "| hardware | 1 x NVIDIA H100 |",
                 "| training time | 62 min |", "max_steps: 120", "## Limits", 'tokenizer("Once upon a time"'):
        assert fact in card.text
    run_card_code(card, {"me/tiny-gpt2": runs["final"]})
    assert capsys.readouterr().out.startswith("Once upon a time")
    assert_no_token(result.stdout, result.stderr, *(c.decode(errors="replace") for c in remote.values()),
                    folders=[runs["root"], tmp_path])


def test_adapter_is_private_by_default_and_carries_counts_only(runs, hub, tmp_path):
    result = push(hub.url, runs["adapter"], "--repo", "style", "--base_model", "me/tiny-base", home=tmp_path)
    out = ok(result)
    assert f"published: {hub.url}/me/style" in out  # "style" resolved to the token's own account
    assert hub.created == [{"name": "style", "organization": "me", "visibility": "private"}]
    assert hub.repos["me/style"].private
    remote = hub.files("me/style")
    remote.pop(".gitattributes")
    shipped = {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
               "tokenizer_config.json"}
    assert remote == local_files(runs["adapter"], shipped)  # samples.txt stayed on the machine
    for content in remote.values():
        assert not any(text.encode() in content for text in PERSONAL)

    card, meta = card_of(remote)
    assert (meta["library_name"], meta["base_model"]) == ("peft", "me/tiny-base")
    assert "datasets" not in meta and {"lora", "peft"} <= set(meta["tags"])
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "loss": 2.75, "perplexity": 15.64, "bits_per_byte": 0.97}
    for fact in ("| tokens | 20,480 |", "train documents 10, heldout documents 1", "lora_r: 2",
                 "This repository is private"):
        assert fact in card.text
    run_card_code(card, {"me/tiny-base": runs["base"], "me/style": runs["adapter"]})
    assert_no_token(result.stdout, result.stderr, folders=[runs["root"], tmp_path])


def test_personal_run_goes_to_a_public_repo_only_when_asked(runs, hub, tmp_path):
    hub.repos["me/style-public"] = Repo(private=False)  # already on the Hub, public
    refused = push(hub.url, runs["adapter"], "--repo", "me/style-public", "--base_model", "me/tiny-base", home=tmp_path)
    assert refused.returncode == 2
    assert "me/style-public already exists and is public" in refused.stderr.strip().splitlines()[-1]
    assert hub.repos["me/style-public"].commits == []

    # Asked for, as a pull request: exists-ok reuses the repo, main stays as it was.
    out = ok(push(hub.url, runs["adapter"], "--repo", "me/style-public", "--base_model", "me/tiny-base", "--public",
                  "--create_pr", home=tmp_path))
    assert f"published: {hub.url}/me/style-public/discussions/1" in out
    assert hub.created[-1]["visibility"] == "public"
    repo = hub.repos["me/style-public"]
    assert set(repo.refs["main"]) == {".gitattributes"} and [c["ref"] for c in repo.commits] == ["refs/pr/1"]
    weights = runs["adapter"] / "adapter_model.safetensors"
    assert repo.refs["refs/pr/1"]["adapter_model.safetensors"] == weights.read_bytes()


def test_folders_away_from_their_run_push_private(runs, hub, tmp_path):
    """A model merged from a LoRA adapter says so itself (provenance.json, written by save_merged): copied out of
    its run, without the summary.json next to it, it still goes to a private repo, as a personal run. A folder
    that says nothing of where it comes from is private by default too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_gpt.lora import save_merged

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), runs["adapter"])
    save_merged(adapted, AutoTokenizer.from_pretrained(runs["adapter"]), tmp_path / "run" / "merged")
    copied = tmp_path / "downloads" / "my-style"
    shutil.copytree(tmp_path / "run" / "merged", copied)
    (copied / "samples.private.md").write_text("Dear diary, my secret is that alice keeps a journal.\n")
    ok(push(hub.url, copied, "--repo", "me/my-style", home=tmp_path))
    assert hub.created == [{"name": "my-style", "organization": "me", "visibility": "private"}]
    assert hub.repos["me/my-style"].private
    remote = hub.files("me/my-style")
    remote.pop(".gitattributes")
    assert remote == {name: data for name, data in local_files(copied).items()
                      if name not in ("samples.private.md", "provenance.json")}  # model and tokenizer files only
    card, meta = card_of(remote)
    assert "personal-style" in meta["tags"] and "This repository is private" in card.text
    assert "merged from a LoRA adapter" in card.text

    plain = tmp_path / "plain"  # a pretrained model copied without its run: nothing says where it comes from
    shutil.copytree(runs["final"], plain)
    assert read_folder(runs["final"]).visibility(None) is None and read_folder(plain).visibility(None) is True


def test_push_to_a_branch(runs, hub, tmp_path):
    out = ok(push(hub.url, runs["final"], "--repo", "me/tiny-rev", "--revision", "v1", home=tmp_path))
    assert f"published: {hub.url}/me/tiny-rev/tree/v1" in out
    repo = hub.repos["me/tiny-rev"]
    assert set(repo.refs["main"]) == {".gitattributes"}  # main untouched; v1 made from it and pushed to
    assert hub.files("me/tiny-rev", "v1") == {".gitattributes": repo.refs["main"][".gitattributes"],
                                              **local_files(runs["final"])}
    assert 'revision="v1"' in repo.refs["v1"]["README.md"].decode()  # the card loads what it describes


def test_clear_errors(runs, hub, tmp_path):
    """Each failure: exit 2, one line that says what is wrong, no traceback, no token, nothing created."""
    with socket.socket() as s:  # a port on loopback that nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    cases = [(None, hub.url, "no Hugging Face token: run `hf auth login` or set HF_TOKEN"),
             ("hf_NotAValidTokenAtAllAbCdEfGhIjKlMnOp", hub.url, "the Hub rejected the token (401 Unauthorized)"),
             (READ_TOKEN, hub.url, "no permission to write to me/tiny-ro with this token (403 Forbidden"),
             (TOKEN, closed, f"cannot reach the Hugging Face Hub at {closed} (ConnectError")]
    for token, endpoint, message in cases:
        sent = len(hub.requests)
        result = push(endpoint, runs["final"], "--repo", "me/tiny-ro", token=token, home=tmp_path)
        assert result.returncode == 2, (message, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (message, last)
        assert "Traceback" not in result.stderr
        assert token or len(hub.requests) == sent  # without a token, nothing is sent at all
        assert_no_token(result.stdout, result.stderr, folders=[tmp_path])
    assert hub.repos == {}
    assert ("POST", "/api/repos/create") in hub.requests  # the read-only token got as far as the Hub's refusal
    card = runs["final"] / "README.md"  # each stopped before the folder was loaded and its card written
    assert not card.exists() or "me/tiny-ro" not in card.read_text()


def test_plain_folder_gets_a_card_without_a_run(runs, tmp_path):
    """No summary.json or config.yaml next to it: still a valid card; with a chat template, chat code that runs."""
    from transformers import AutoTokenizer

    folder = tmp_path / "plain"
    shutil.copytree(runs["final"], folder, ignore=shutil.ignore_patterns("README.md"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}### Response:\n"
    tokenizer.save_pretrained(folder)
    files = prepare_folder(read_folder(folder), "me/plain")
    assert [f.name for f in files] == sorted(p.name for p in folder.iterdir())  # README.md written and listed
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and "model-index" not in meta and "datasets" not in meta
    assert "Not recorded" in card.text and "apply_chat_template" in card.text
    run_card_code(card, {"me/plain": folder})


def test_an_adapter_card_names_no_path_of_its_local_base(runs, tmp_path):
    """Without --base_model the card cannot link the base, and it names no folder of this machine either."""
    folder = tmp_path / "adapter"
    shutil.copytree(runs["adapter"], folder)
    prepare_folder(read_folder(folder), "me/style")
    card = (folder / "README.md").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("path/to/base-model")' in card
    assert str(runs["base"]) not in card and str(runs["base"]).replace(str(Path.home()), "~") not in card
    assert str(tmp_path) not in card


def test_folder_is_checked_before_anything_is_sent(runs, tmp_path):
    broken = tmp_path / "run" / "final"
    shutil.copytree(runs["final"], broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:200])
    with pytest.raises(UserError, match=r"final does not load with transformers"):
        prepare_folder(read_folder(broken), "me/broken")
    with pytest.raises(UserError, match=r"looks like a run folder: pass .*final"):
        read_folder(tmp_path / "run")
    with pytest.raises(UserError, match=r"has no row for"):
        results_row(runs["results"], runs["adapter"])


# --- Reading from the Hub: the flagship recipe's data and the comparison's reference model -------------------------

@pytest.fixture(scope="module")
def hub_to_read(corpus, tokenizer_dir, tmp_path_factory):
    """The stand-in serving HuggingFaceFW/fineweb-edu (sample-10BT: the test corpus in two Parquet files; the
    default config: other documents) and a tiny GPT-2 as openai-community/gpt2."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    dataset = {"README.md": FINEWEB_EDU_README,
               "sample/10BT/000_00000.parquet": fineweb_edu_parquet(texts[:40], 0),
               "sample/10BT/001_00000.parquet": fineweb_edu_parquet(texts[40:], 40),
               "data/CC-MAIN-2024-10/000_00000.parquet": fineweb_edu_parquet(["not the sample"] * 4, 0)}
    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)  # the same tiny model every time
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with HubStandIn({}, max_requests=5000, lifetime_s=900) as server:
        server.add_repo("HuggingFaceFW/fineweb-edu", dataset, kind="dataset")
        server.add_repo("openai-community/gpt2", {p.name: p.read_bytes() for p in folder.iterdir()})
        server.model_folder, server.texts = folder, texts
        yield server
    assert server.unhandled == [], f"the clients called endpoints the stand-in lacks: {server.unhandled}"


def fineweb_args(tiny_args: list[str], out: Path, *more: str) -> list[str]:
    """The tiny run on FineWeb-Edu streamed from the stand-in, validated on its first 8 documents."""
    local = tiny_args[tiny_args.index("--tokenizer"):]  # the test's tokenizer and model; not its corpus
    return ["scripts/pretrain.py", "--dataset", "HuggingFaceFW/fineweb-edu", "--dataset_config", "sample-10BT",
            "--val_documents", "8", *local, "--lr_scheduler", "constant", "--warmup_steps", "0",
            "--output_dir", str(out), *more]


def streamed(args: list[str], hub: HubStandIn, home: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=hub_env(hub.url, home), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_resumed_like(whole: Path, resumed: Path) -> None:
    """The resumed run logged the uninterrupted run's losses and ended with its weights, to rounding."""
    from safetensors.torch import load_file

    assert_losses_match(*({r["step"]: r["loss"] for r in metrics(run) if "loss" in r} for run in (whole, resumed)))
    assert_weights_match(*(load_file(run / "final" / "model.safetensors") for run in (whole, resumed)))


def test_pretrain_streams_fineweb_edu_from_the_hub_starts_in_seconds_and_resumes_exactly(hub_to_read, tiny_args,
                                                                                         tmp_path):
    home = tmp_path / "home"
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    streamed(fineweb_args(tiny_args, whole, "--max_steps", "4", "--save_every", "2"), hub_to_read, home)
    summary = json.loads((whole / "summary.json").read_text())
    assert 0 < summary["launch_to_first_step_s"] <= 60  # launch to the first optimizer step, the stream opened from the Hub
    # The sample's Parquet files were read by byte ranges; the default config's were never opened.
    read = {path for path, _ in hub_to_read.ranges}
    assert {"sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"} <= read
    assert not any(path.startswith("data/") for path in read)

    # The same run as if it had been killed after its checkpoint at step 2, then resumed.
    shutil.copytree(whole, halves)
    for later in ("final", "checkpoints/step_00000004"):
        shutil.rmtree(halves / later)
    (halves / "summary.json").unlink()
    resumed = streamed(fineweb_args(tiny_args, halves, "--max_steps", "4", "--save_every", "2", "--resume"),
                       hub_to_read, home)
    assert "resumed from" in resumed.stdout and "step_00000002 at step 2" in resumed.stdout
    assert_resumed_like(whole, halves)


def test_pretrain_streams_fineweb_edu_on_two_processes_with_hellaswag_and_resumes_exactly(hub_to_read, tiny_args,
                                                                                          tmp_path):
    from test_engine import launch_two

    run, halves = tmp_path / "two", tmp_path / "halves"
    hellaswag = ROOT / "tests" / "data" / "hellaswag_val_tiny.jsonl.xz"
    env = hub_env(hub_to_read.url, tmp_path / "home")
    launch_two(*fineweb_args(tiny_args, run, "--max_steps", "4", "--save_every", "2", "--hellaswag", str(hellaswag)),
               env=env)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 2 and 0 < summary["launch_to_first_step_s"] <= 60
    [last] = [r for r in metrics(run) if "val_loss" in r]
    # Each process scored half of the 8 items, and the counts were summed: a share of 8.
    assert last["hellaswag_acc_norm"] * 8 == round(last["hellaswag_acc_norm"] * 8)

    # As if both processes had been killed after the checkpoint at step 2: resumed on two, each process reads on
    # from its own place in its own share of the stream.
    shutil.copytree(run, halves)
    for later in ("final", "checkpoints/step_00000004"):
        shutil.rmtree(halves / later)
    (halves / "summary.json").unlink()
    resumed = launch_two(*fineweb_args(tiny_args, halves, "--max_steps", "4", "--save_every", "2", "--hellaswag",
                                       str(hellaswag), "--resume"), env=env)
    assert "step_00000002 at step 2" in resumed.stdout + resumed.stderr
    assert_resumed_like(run, halves)


def test_compare_downloads_openai_gpt2_from_the_hub_and_scores_it(hub_to_read, tmp_path):
    from hf_gpt.benchmarks import load_benchmark, run_hellaswag
    from hf_gpt.evaluation import heldout_loss
    from hf_gpt.loading import load_model

    hellaswag = ROOT / "tests" / "data" / "hellaswag_val_tiny.jsonl.xz"
    out = tmp_path / "cmp"
    result = subprocess.run([sys.executable, "scripts/compare.py", "openai-community/gpt2", "--tasks", "text,hellaswag",
                             "--hellaswag", str(hellaswag), "--max_documents", "5", "--output_dir", str(out)],
                            cwd=ROOT, env=hub_env(hub_to_read.url, tmp_path / "home"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    scores = json.loads((out / "results.json").read_text())["models"]["openai-community/gpt2"]
    # The same figures as the model scored here from the folder it was published from: what was downloaded is it,
    # and the default held-out text is FineWeb-Edu's first documents, the head gpt2-small.yaml holds out.
    model, tokenizer = load_model(str(hub_to_read.model_folder))
    expected = {**heldout_loss(model, tokenizer, hub_to_read.texts[:5]),
                **run_hellaswag(model, tokenizer, load_benchmark("hellaswag", str(hellaswag))[0])}
    assert {k: scores[k] for k in expected} == pytest.approx(expected)


def test_standin_run_serves_a_local_corpus_as_fineweb_edu_its_validation_first(corpus, tokenizer_dir, tmp_path):
    """scripts/standin_run.py (how gpt2-small.yaml was measured on a GPU without the Hub): the real clients,
    pointed at it, stream the corpus as FineWeb-Edu with validation.parquet's documents at the head, load the
    tokenizer as openai-community/gpt2 and HellaSwag as Rowan/hellaswag; the command's exit status comes back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    local = tmp_path / "corpus"
    local.mkdir()
    pq.write_table(pa.table({"text": texts[:3]}), local / "validation.parquet")
    pq.write_table(pa.table({"text": texts[3:40]}), local / "train-0000.parquet")
    pq.write_table(pa.table({"text": texts[40:]}), local / "train-0001.parquet")
    probe = (
        "import json; from datasets import load_dataset; from transformers import AutoTokenizer\n"
        "stream = load_dataset('HuggingFaceFW/fineweb-edu', 'sample-10BT', split='train', streaming=True)\n"
        "rows = list(stream)\n"
        "print(json.dumps({'texts': [r['text'] for r in rows], 'columns': sorted(rows[0]),\n"
        "    'vocab': len(AutoTokenizer.from_pretrained('openai-community/gpt2')),\n"
        "    'hellaswag': len(load_dataset('Rowan/hellaswag', split='validation'))}))\n"
        "raise SystemExit(3)\n")
    hellaswag = ROOT / "tests" / "data" / "hellaswag_val_tiny.jsonl.xz"
    result = subprocess.run([sys.executable, "scripts/standin_run.py", "--corpus", str(local), "--tokenizer",
                             str(tokenizer_dir), "--hellaswag", str(hellaswag), "--", sys.executable, "-c", probe],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-3000:]
    served = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert served["texts"] == texts  # validation's 3 documents first (the head val_documents holds out), then train
    assert {"text", "id", "dump", "url", "language", "score", "int_score"} <= set(served["columns"])
    from transformers import AutoTokenizer

    assert served["vocab"] == len(AutoTokenizer.from_pretrained(tokenizer_dir))
    with lzma.open(hellaswag, "rt") as f:
        assert served["hellaswag"] == sum(1 for line in f if line.strip())
    assert "endpoints it lacks: none" in result.stdout
