import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from conftest import ROOT, assert_losses_match, assert_weights_match, run_script
from hf_gpt.checkpoints import checkpoint_dirs, save_checkpoint, save_final
from hf_gpt.config import PretrainConfig, UserError, load_config
from hf_gpt.data import PretrainData
from hf_gpt.engine import RunResult, run_length, train
from hf_gpt.files import damaged_file, recover_folders, write_manifest
from hf_gpt.loading import load_tokenizer
from hf_gpt.metrics_log import MetricsLog
from hf_gpt.model import build_model
from hf_gpt.start import start_run

STEPS = 40


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("runs") / "straight"
    args = module_args(corpus, tokenizer_dir)
    run_script("scripts/pretrain.py", *args, "--max_steps", str(STEPS), "--output_dir", str(out))
    return out, args


def module_args(corpus, tokenizer_dir):
    return ["--dataset", str(corpus), "--tokenizer", str(tokenizer_dir), "--n_layer", "2", "--n_head", "2",
            "--n_embd", "32", "--block_size", "64", "--micro_batch_size", "4", "--val_fraction", "0.1",
            "--warmup_steps", "2", "--learning_rate", "3e-3", "--eval_every", "0", "--eval_batches", "2",
            "--mixed_precision", "no", "--sample_prompts", "def ",
            "--dropout", "0.1", "--crop", "random",  # dropout and crop: resume must restore their RNGs
            # No checkpoint (7, 14, ...) on a log step (5, 10, ...): a resumed run's first window is short.
            "--log_every", "5", "--save_every", "7"]


def as_lists(state):
    """A saved state with its tensors (the stream's buffer of rows) as lists, to compare with ==."""
    if isinstance(state, dict):
        return {k: as_lists(v) for k, v in state.items()}
    return state.tolist() if isinstance(state, torch.Tensor) else state


def test_killed_and_resumed_run_equals_uninterrupted_run(straight_run, tmp_path):
    straight, args = straight_run
    out = tmp_path / "resumed"
    cmd = [sys.executable, "scripts/pretrain.py", *args, "--max_steps", str(STEPS), "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "step_00000007").exists():
            proc.kill()
            break
        time.sleep(0.05)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == -signal.SIGKILL, log
    assert not (out / "final").exists()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 1.2')  # a row the kill cut short

    resumed = run_script("scripts/pretrain.py", *args, "--max_steps", str(STEPS), "--output_dir", str(out), "--resume")
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = losses(straight), losses(out)
    assert sorted(a) == sorted(b) == list(range(5, STEPS + 1, 5))
    assert_losses_match(a, b)
    # Same documents: the stream positions at the end are identical, and so are the weights.
    def final_state(run):
        state = torch.load(sorted((run / "checkpoints").glob("step_*"))[-1] / "progress_0.pt", weights_only=True)
        return as_lists(state)

    assert final_state(straight)["data"] == final_state(out)["data"]
    wa = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert_weights_match(wa, wb)


def test_final_folder_loads_with_plain_transformers(straight_run):
    run = straight_run[0] / "final"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in run.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert type(model).__name__ == "GPT2LMHeadModel"
    text = pipeline("text-generation", model=str(run))("def ", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("def ") and len(tokenizer(text).input_ids) > len(tokenizer("def ").input_ids)
    summary = json.loads((straight_run[0] / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["eval"]["val_loss"] > 0
    assert (straight_run[0] / "loss.png").stat().st_size > 0


def train_in_process(args: list[str], data_wrapper=None) -> RunResult:
    cfg = load_config(PretrainConfig, args)
    accelerator = start_run(cfg)
    data = PretrainData(cfg, load_tokenizer(cfg.tokenizer))
    model = build_model(cfg, len(data.tokenizer), data.tokenizer.eos_token_id)
    return train(cfg, model, data.tokenizer, data_wrapper(data) if data_wrapper else data, accelerator)


def in_process_run(args: list[str], data_wrapper=None):
    train_in_process(args, data_wrapper)
    return AutoModelForCausalLM.from_pretrained(Path(load_config(PretrainConfig, args).output_dir) / "final").state_dict()


class StopAt:
    """Sends this process SIGTERM, as `kill -TERM` would, while the loop reads the batch of step `step`."""

    def __init__(self, data, step: int):
        self.data, self.step = data, step

    def train_batches(self, rank, world):
        inner, stop_at = self.data.train_batches(rank, world), self.step  # the first read is step 1's (read ahead)
        reads = 0

        class Batches:
            def __next__(self):
                nonlocal reads
                reads += 1
                if reads == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return next(inner)

            state_dict, load_state_dict = inner.state_dict, inner.load_state_dict

        return Batches()

    def eval_batches(self, rank, world):
        return self.data.eval_batches(rank, world)


TIMING = ("tokens_per_s", "mfu", "peak_memory_gib", "eta_s", "eval_seconds", "train_s")


def rows_without_timing(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in MetricsLog(run / "metrics.jsonl").rows()]


def test_a_run_stopped_by_a_signal_between_log_steps_resumes_with_the_same_rows(tiny_args, tmp_path):
    common = [*tiny_args, "--max_steps", "8", "--log_every", "3", "--dropout", "0.1"]
    train_in_process([*common, "--output_dir", str(tmp_path / "straight")])
    stopped = tmp_path / "stopped"
    result = train_in_process([*common, "--output_dir", str(stopped)], lambda data: StopAt(data, 4))
    assert result.stopped_early and result.steps == 4
    assert not (stopped / "final").exists()
    assert train_in_process([*common, "--output_dir", str(stopped), "--resume"]).steps == 8
    assert rows_without_timing(stopped) == rows_without_timing(tmp_path / "straight")


def test_a_run_reading_ahead_stopped_and_resumed_logs_the_rows_of_one_that_never_read_ahead(tiny_args, tmp_path):
    """Batches read in a background thread (read_ahead) are the loop's own, in its order; the checkpoint of a run
    stopped while its reader was ahead holds what it read, so that resumed (here reading ahead less) it goes on
    exactly."""
    common = [*tiny_args, "--max_steps", "8", "--log_every", "3", "--dropout", "0.1"]
    train_in_process([*common, "--output_dir", str(tmp_path / "straight")])
    stopped = tmp_path / "stopped"
    result = train_in_process([*common, "--read_ahead", "4", "--output_dir", str(stopped)],
                              lambda data: StopAt(data, 6))  # the reader's 6th read: the loop is behind it
    assert result.stopped_early and result.steps < 8
    state = torch.load(checkpoint_dirs(stopped)[-1] / "progress_0.pt", weights_only=True)
    assert "pending" in state["data"]  # the batches read and not yet served (as a rule some: the reader is ahead)
    assert train_in_process([*common, "--read_ahead", "2", "--output_dir", str(stopped), "--resume"]).steps == 8
    assert rows_without_timing(stopped) == rows_without_timing(tmp_path / "straight")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_run_stopped_by_a_signal_exits_with_128_plus_its_number(tiny_args, tmp_path, signum, status):
    """As a shell reports a process the signal ended, so that a script tells it from a finished run (exit 0)."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "scripts/pretrain.py", *tiny_args, "--max_steps", "5000",
                                "--output_dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None and not (
                (out / "metrics.jsonl").exists() and losses(out)):
            time.sleep(0.1)
        process.send_signal(signum)
        log = process.communicate(timeout=240)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    assert process.returncode == status, log[-3000:]
    assert "stopped by signal" in log and "continue with --resume" in log, log[-3000:]
    assert checkpoint_dirs(out) and not (out / "final").exists()


def test_a_checkpoint_without_progress_files_names_the_previous_one(tiny_args, tmp_path):
    """Not "saved by 0 processes ... resume with 0": the checkpoint is damaged, and the one before it serves."""
    out = tmp_path / "run"
    common = [*tiny_args, "--max_steps", "6", "--output_dir", str(out)]
    train_in_process([*common, "--save_every", "2"], lambda data: StopAt(data, 4))
    first, latest = checkpoint_dirs(out)
    (latest / "progress_0.pt").unlink()
    with pytest.raises(UserError) as error:
        train_in_process([*common, "--resume"])
    assert str(error.value) == (f"{latest} is incomplete or damaged: it holds no progress_*.pt (each process's "
                                f"place in the data); remove it, and --resume then continues from {first}")


def flip_bytes(path: Path, at: int = -64) -> None:
    """Flips a few bytes inside `path` (by default near its end, in the weights, past a safetensors header)."""
    data = bytearray(path.read_bytes())
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bytes_is_refused_naming_the_file_and_the_previous_one(tiny_args, tmp_path):
    """Flipped weights would load without a word (the file is still valid safetensors) and train on from there;
    the manifest saved with the checkpoint catches them, and the checkpoint before is named."""
    out = tmp_path / "run"
    common = [*tiny_args, "--max_steps", "6", "--output_dir", str(out)]
    train_in_process([*common, "--save_every", "2"], lambda data: StopAt(data, 4))
    first, latest = checkpoint_dirs(out)
    flip_bytes(latest / "model.safetensors")
    with pytest.raises(UserError) as error:
        train_in_process([*common, "--resume"])
    assert str(error.value) == (f"{latest} is damaged: model.safetensors: its bytes differ from those saved (sha256 "
                                f"in manifest.json); remove it, and --resume then continues from {first}")
    shutil.rmtree(latest)  # as the line says: the run goes on from the checkpoint before
    assert train_in_process([*common, "--resume"]).steps == 6


def test_generate_refuses_a_final_folder_with_flipped_bytes(straight_run, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(straight_run[0] / "final", final)
    flip_bytes(final / "model.safetensors")
    result = run_script("scripts/generate.py", str(final), "--prompt", "def ", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model '{final}' could not be loaded: model.safetensors: its bytes differ from those saved (sha256 in "
        "manifest.json); it was damaged since it was saved; replace the folder with a good copy")


@pytest.mark.parametrize("damage", ["truncated", "empty optimizer", "another model's weights", "custom pickle"])
def test_a_damaged_checkpoint_without_a_manifest_is_one_line(finished_run, tmp_path, damage):
    """Checkpoints saved before manifests still resume; damaged, they are one line, not a traceback."""
    run, resume = finished_run
    latest = checkpoint_dirs(run)[-1]
    (latest / "manifest.json").unlink()
    weights = latest / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "empty optimizer":
        (latest / "optimizer.bin").write_bytes(b"")
    elif damage == "custom pickle":  # accelerate would unpickle it in full; it refuses, and so does this line
        marker = tmp_path / "marker"
        torch.save(RunsCode(marker), latest / "custom_checkpoint_0.pkl")
    else:
        from safetensors.torch import load_file, save_file
        save_file({k: torch.cat([v, v]) for k, v in load_file(weights).items()}, weights)
    with pytest.raises(UserError, match=f"^{latest} could not be loaded \\(.*\\); remove it, and --resume then "):
        train_in_process(resume)
    assert not (tmp_path / "marker").exists()


def test_checkpoints_of_a_tied_model_save_without_the_shared_tensor_warning(tiny_args, tmp_path, caplog):
    """accelerate warns at every save that it left lm_head.weight out (it is the token embeddings); the head comes
    back tied on load, so the line is dropped, and only that one."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train_in_process([*tiny_args, "--max_steps", "2", "--save_every", "1", "--output_dir", str(out)])
        logging.getLogger("accelerate.utils.other").warning("Removed shared tensor {'a', 'b'} while saving")
    assert [r.getMessage() for r in caplog.records if "shared tensor" in r.getMessage()] == [
        "Removed shared tensor {'a', 'b'} while saving"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_run_that_trained_in_linear_layout_is_refused_before_any_work(tiny_args, tmp_path):
    """Its checkpoints hold the optimizer's moments transposed (GPT-2's Conv1D layers trained as nn.Linear, a
    layout since removed): resuming says so in one line and leaves the run's files as they were."""
    run = tmp_path / "old"
    train_in_process([*tiny_args, "--max_steps", "8", "--output_dir", str(run)], lambda data: StopAt(data, 4))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["linear_layout"] = True  # as a run of the version that had it wrote config.yaml
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"holds its optimizer's state for GPT-2's layers trained as nn.Linear "
                                        r"\(linear_layout: true\)"):
        train_in_process([*tiny_args, "--max_steps", "8", "--output_dir", str(run), "--resume"])
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.fixture
def finished_run(straight_run, tmp_path):
    """A copy of the finished straight run, and the arguments that resume it."""
    run, args = straight_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", [*args, "--max_steps", str(STEPS), "--output_dir", str(tmp_path / "run"), "--resume"]


@pytest.mark.parametrize("change, message", [
    (["--learning_rate", "0.5", "--lr_scheduler", "constant"], "learning_rate 0.003 -> 0.5, lr_scheduler 'cosine' -> 'constant'"),
    (["--n_embd", "48"], "n_embd 32 -> 48"),
])
def test_resume_refuses_other_settings_with_one_line(finished_run, change, message):
    run, resume = finished_run
    config = (run / "config.yaml").read_text()
    with pytest.raises(UserError) as refused:
        train_in_process([*resume, *change])
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert (run / "config.yaml").read_text() == config


def test_resume_may_extend_a_run_and_keeps_its_config(finished_run, capsys):
    run, resume = finished_run
    config = (run / "config.yaml").read_text()
    assert train_in_process([*resume, "--max_steps", str(STEPS + 5)]).steps == STEPS + 5
    assert f"changed: max_steps {STEPS} -> {STEPS + 5}" in capsys.readouterr().out
    assert max(losses(run)) == STEPS + 5
    assert (run / "config.yaml").read_text() == config  # the settings the run was started with


def test_resume_refuses_another_number_of_processes(finished_run):
    run, resume = finished_run
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    shutil.copy(last / "progress_0.pt", last / "progress_1.pt")  # as if saved by two processes
    with pytest.raises(UserError, match="saved by 2 processes and this run has 1; resume with 2"):
        train_in_process(resume)


def test_resuming_a_finished_run_does_nothing(finished_run, capsys):
    run, resume = finished_run
    def files():  # all but the lock, which names the process holding the folder
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    result = train_in_process(resume)
    assert result.steps == STEPS and result.eval["val_loss"] > 0
    assert "already finished at step 40" in capsys.readouterr().out
    assert files() == before


class RunsCode:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("name", ["progress_0.pt", "random_states_0.pkl", "optimizer.bin"])
def test_a_checkpoint_that_would_run_code_is_refused(finished_run, tmp_path, name):
    run, resume = finished_run
    marker = tmp_path / "marker"
    latest = sorted((run / "checkpoints").glob("step_*"))[-1]
    torch.save(RunsCode(marker), latest / name)
    write_manifest(latest)  # a manifest is no defence against whoever sent the checkpoint: they write it too
    with pytest.raises(UserError, match="refused as it could run code"):
        train_in_process(resume)
    assert not marker.exists()


@pytest.mark.parametrize("crash", ["moving the old aside", "moving the new in", "deleting the old"])
@pytest.mark.parametrize("folder", ["final", "checkpoint"])
def test_a_crash_while_swapping_a_folder_in_leaves_a_complete_one(tmp_path, tokenizer_dir, monkeypatch, crash, folder):
    accelerator = Accelerator()
    model = build_model(PretrainConfig(n_layer=1, n_head=2, n_embd=32), 512, 0)
    tokenizer = load_tokenizer(str(tokenizer_dir))

    class Batches:
        def state_dict(self):
            return {"version": version}

    def save(target: Path):
        if folder == "final":
            save_final(accelerator, model, tokenizer, target)
        else:
            save_checkpoint(accelerator, tmp_path, {"step": 3}, Batches(), keep=2)

    def saved(target: Path):
        if folder == "final":
            return AutoModelForCausalLM.from_pretrained(target).transformer.wte.weight[0, 0].item()
        return torch.load(target / "progress_0.pt", weights_only=True)["data"]["version"]

    target = tmp_path / "final" if folder == "final" else tmp_path / "checkpoints" / "step_00000003"
    version = 1.0
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = version
    save(target)

    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src, dst):
        if (crash == "moving the old aside" and Path(src) == target
                or crash == "moving the new in" and Path(dst) == target):
            raise OSError("simulated crash")
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if crash == "deleting the old" and Path(path).name.endswith(".old"):
            raise OSError("simulated crash")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    version = 2.0
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = version
    with pytest.raises(OSError, match="simulated crash"):
        save(target)
    monkeypatch.undo()

    recover_folders(tmp_path)  # what the next run does first
    assert saved(target) == (2.0 if crash == "deleting the old" else 1.0)
    assert not target.with_name(target.name + ".old").exists()


class RaggedLabels:
    """Masks a different number of labels in every row, as SFT padding does: micro-batches then carry
    different numbers of target tokens, which is where per-micro-batch averaging would go wrong."""

    def __init__(self, data):
        self.data = data

    def train_batches(self, rank, world):
        inner = self.data.train_batches(rank, world)

        class Batches:
            def __next__(self):
                batch = next(inner)
                for row in range(batch["labels"].shape[0]):
                    batch["labels"][row, : 5 + 13 * (int(batch["input_ids"][row, 0]) % 4)] = -100
                return batch

            state_dict, load_state_dict = inner.state_dict, inner.load_state_dict

        return Batches()

    def eval_batches(self, rank, world):
        return self.data.eval_batches(rank, world)


@pytest.mark.parametrize("wrapper", [None, RaggedLabels])
def test_accumulation_equals_one_large_batch(tiny_args, tmp_path, wrapper):
    # A huge Adam epsilon makes the update linear in the gradient (lr * m / eps, SGD with momentum):
    # plain Adam would hide a wrongly scaled loss (it is scale-invariant) and amplify float rounding
    # on rows whose gradient is almost zero. Rows in stream order: both runs then train on the same rows.
    common = [*tiny_args, "--max_steps", "2", "--learning_rate", "10", "--adam_epsilon", "100", "--warmup_steps", "0",
              "--max_grad_norm", "0", "--shuffle_rows", "0"]
    big = in_process_run([*common, "--micro_batch_size", "8", "--output_dir", str(tmp_path / "big")], wrapper)
    small = in_process_run([*common, "--micro_batch_size", "2", "--gradient_accumulation_steps", "4",
                            "--output_dir", str(tmp_path / "small")], wrapper)
    initial = build_model(load_config(PretrainConfig, tiny_args), 512, 0).state_dict()
    assert any(not torch.allclose(big[n], initial[n]) for n in big)  # training moved the weights
    for name in big:
        torch.testing.assert_close(small[name] - initial[name], big[name] - initial[name], atol=1e-6, rtol=1e-4)


def test_varlen_runs_train_through_qkv_attention(tiny_args, tmp_path, monkeypatch):
    """A varlen run's attention modules get the qkv projection whole (QKVAttention), and the run trains as
    GPT-2's own attention module would: the same weights after two steps."""
    import hf_gpt.engine
    from hf_gpt.model import QKVAttention, qkv_attention

    swapped = []

    def spy(model):
        qkv_attention(model)
        swapped.extend(type(block.attn) is QKVAttention for block in model.transformer.h)

    args = [*tiny_args, "--attn_implementation", "varlen", "--max_steps", "2"]
    monkeypatch.setattr(hf_gpt.engine, "qkv_attention", spy)
    fused = in_process_run([*args, "--output_dir", str(tmp_path / "fused")])
    assert swapped == [True, True]
    monkeypatch.setattr(hf_gpt.engine, "qkv_attention", lambda model: None)
    split = in_process_run([*args, "--output_dir", str(tmp_path / "split")])
    for name in fused:
        torch.testing.assert_close(fused[name], split[name], msg=name)


def test_the_run_length_is_max_steps_else_max_tokens_else_epochs():
    from dataclasses import replace

    cfg = PretrainConfig(max_steps=0, max_tokens=0, epochs=3)
    assert run_length(cfg, 256, 7 / 3) == 7  # 3 passes of 7/3 steps: 7, not 8 by a rounding error
    assert run_length(replace(cfg, epochs=0.5), 256, 3) == 2
    assert run_length(replace(cfg, max_tokens=2600), 256, 7 / 3) == 10
    assert run_length(replace(cfg, max_steps=5, max_tokens=2600), 256, None) == 5
    with pytest.raises(UserError, match="epochs needs data of known size"):
        run_length(cfg, 256, None)  # a streamed corpus
    with pytest.raises(UserError, match="set max_steps, max_tokens or epochs"):
        run_length(replace(cfg, epochs=0), 256, 3)


def test_an_existing_run_is_never_overwritten(straight_run):
    run, args = straight_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    result = run_script("scripts/pretrain.py", *args, "--max_steps", "2", "--output_dir", str(run), check=False)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("extra, message", [
    (["--config", "CONFIG"], "unknown key(s) not_a_field"),
    (["--dataset", "./no/such/folder"], "dataset path not found: ./no/such/folder"),
    (["--dataset", "someone/not-reachable"], "dataset 'someone/not-reachable' could not be loaded from the Hub"),
    (["--tokenizer", "someone/no-tokenizer"], "tokenizer 'someone/no-tokenizer' could not be loaded"),
    pytest.param(["--attn_implementation", "flex_attention"], "flex_attention trains on GPUs only",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal")),
    (["--output_dir", "CONFIG"], "is a file, not a folder"),
    pytest.param(["--output_dir", "/sys/kernel"], "cannot write in output_dir /sys/kernel: Permission denied",
                 marks=pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="a folder nobody may write in, "
                                          "root included (chmod does not stop root)")),
    (["--log_every", "0"], "log_every must be 1 or more, not 0"),
    (["--micro_batch_size", "0"], "micro_batch_size must be 1 or more, not 0"),
    (["--learning_rate", "abc"], "error: argument --learning_rate: invalid float value: 'abc'"),
    (["--max_steps", "-5", "--tokenizer", "train"], "max_steps must be 0 or more, not -5"),  # not after training a BPE
    (["--n_embd", "30", "--n_head", "4", "--tokenizer", "train"], "n_embd 30 is not a multiple of n_head 4"),
    # 19 billion parameters: refused at once, not built and swapped for minutes
    (["--block_size", "100000000", "--tokenizer", "train"], "needs about"),
])
def test_bad_input_gets_one_clear_line(tiny_args, tmp_path, extra, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("max_steps: 3\nnot_a_field: 1\n")
    extra = [str(recipe) if x == "CONFIG" else x for x in extra]
    result = run_script("scripts/pretrain.py", *tiny_args, "--output_dir", str(tmp_path / "run"), *extra,
                        check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    run = tmp_path / "run"  # a failed start leaves no folder holding only its .lock (the tokenizer it kept, if any)
    assert not run.exists() or [p.name for p in run.iterdir()] not in ([".lock"], [])


def test_push_to_hub_is_checked_before_training(tiny_args, tmp_path):
    """Offline: no token, or HF_HUB_OFFLINE with one; either stops the run before its first step."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    cases = [({"HF_HOME": str(tmp_path / "home")}, "--push_to_hub needs a Hugging Face token"),
             ({"HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 is set")]
    for extra_env, message in cases:
        result = subprocess.run([sys.executable, "scripts/pretrain.py", *tiny_args, "--max_steps", "3",
                                 "--output_dir", str(tmp_path / "run"), "--push_to_hub", "me/tiny"],
                                cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_token_shards_train_with_their_own_tokenizer_only(corpus, tokenizer_dir, tiny_args, tmp_path):
    from hf_gpt.data import DocumentSource, write_token_shards

    shards = tmp_path / "shards"
    tokenizer = load_tokenizer(str(tokenizer_dir))
    write_token_shards(DocumentSource(str(corpus)), tokenizer, shards, holdout=0.1, shard_tokens=10**6)
    # An existing folder is refused before the pass over the corpus, not after it.
    with pytest.raises(UserError, match="already exists"):
        write_token_shards(DocumentSource(str(corpus)), tokenizer, shards, holdout=0.1, shard_tokens=10**6)
    assert not shards.with_name("shards.tmp").exists()

    # The default `tokenizer: train` reads shards with the tokenizer they were made with.
    args = [a for a in tiny_args if a not in ("--tokenizer", str(tokenizer_dir))]
    run = tmp_path / "run"
    run_script("scripts/pretrain.py", *args, "--dataset", str(shards), "--max_steps", "2", "--output_dir", str(run))
    assert AutoTokenizer.from_pretrained(run / "final").get_vocab() == tokenizer.get_vocab()

    # A tokenizer with another end-of-text id would cut the shards into wrong documents.
    other = tmp_path / "other"
    tokenizer.eos_token = "e"
    tokenizer.save_pretrained(other)
    cfg = load_config(PretrainConfig, [*args, "--dataset", str(shards), "--tokenizer", str(other)])
    data = PretrainData(cfg, load_tokenizer(cfg.tokenizer))
    with pytest.raises(UserError, match=r"made with end-of-text id 0, tokenizer .*other has \d+"):
        data.train_batches(0, 1)


def test_a_full_disk_while_saving_is_one_line(tiny_args, tmp_path, monkeypatch):
    from accelerate import Accelerator

    def full(self, output_dir, **kwargs):
        raise OSError(28, "No space left on device", f"{output_dir}/model.safetensors")

    monkeypatch.setattr(Accelerator, "save_state", full)
    with pytest.raises(UserError, match=r"could not write checkpoint step 2 in .*run: OSError: .*No space "
                                        r"left on device.* MiB free there\)"):
        in_process_run([*tiny_args, "--max_steps", "2", "--output_dir", str(tmp_path / "run")])


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]


@pytest.mark.skipif(sys.platform != "linux", reason="the launcher's death reaches its child through prctl")
def test_a_stopped_launcher_checkpoints_its_run_and_a_second_run_is_refused(tiny_args, tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([*LAUNCH, "scripts/pretrain.py", *tiny_args, "--max_steps", "5000",
                                 "--output_dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and launcher.poll() is None and not (
                (out / "metrics.jsonl").exists() and losses(out)):
            time.sleep(0.1)
        # A second run in the same folder, even one that resumes, is refused while the first lives.
        second = run_script("scripts/pretrain.py", *tiny_args, "--max_steps", "3", "--output_dir", str(out),
                            "--resume", check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1].startswith(f"error: {out} is in use by another run (process ")
        launcher.send_signal(signal.SIGTERM)  # the launcher only, as `kill -TERM <pid of accelerate launch>`
        # The output pipe closes once the training process, which shares it, has exited too.
        log = launcher.communicate(timeout=240)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)  # whatever a failed run left behind
    assert "stopped by signal" in log, log[-3000:]
    assert checkpoint_dirs(out) and not (out / "final").exists()
    assert subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode == 1  # no process left


SLOW_SAVE = """import os, time
import torch
_save = torch.save
def save(*args, **kwargs):  # a checkpoint that takes longer to write than a launcher would wait by default
    time.sleep(float(os.environ["SLOW_SAVE"]))
    return _save(*args, **kwargs)
torch.save = save
"""


def test_a_launcher_given_the_time_keeps_the_checkpoint_of_a_slow_save(tiny_args, tmp_path):
    """docs/errors.md: torchrun (what `accelerate launch` runs for several processes) kills the training
    processes TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after its SIGTERM; given the time, a save that takes
    longer than a one-process `accelerate launch` waits (5 s) ends whole."""
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_SAVE)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tmp_path / "slow"), "SLOW_SAVE": "2",
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "1", "scripts/pretrain.py", *tiny_args, "--max_steps", "5000", "--output_dir",
                                 str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and launcher.poll() is None and not (
                (out / "metrics.jsonl").exists() and losses(out)):
            time.sleep(0.1)
        signalled = time.time()
        launcher.send_signal(signal.SIGTERM)
        log = launcher.communicate(timeout=240)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert "stopped by signal" in log, log[-3000:]
    assert time.time() - signalled > 5
    (saved,) = checkpoint_dirs(out)
    assert (saved / "manifest.json").is_file() and damaged_file(saved) is None


def test_a_launched_run_ends_on_its_error_line_with_quiet(tiny_args, tmp_path):
    """What docs/running.md says of `accelerate launch -q`: Accelerate's exit status 1, our line last."""
    result = subprocess.run([*LAUNCH, "-q", "scripts/pretrain.py", *tiny_args, "--log_every", "0",
                             "--output_dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: log_every must be 1 or more, not 0"
    assert "Traceback" not in result.stderr


def test_an_empty_validation_split_stops_the_run_before_training(tiny_args, tmp_path):
    run = tmp_path / "run"
    result = run_script("scripts/pretrain.py", *tiny_args, "--val_fraction", "0.0005", "--max_steps", "50",
                        "--output_dir", str(run), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset ") and "val_fraction 0.0005" in last and "--eval_split" in last
    assert "Traceback" not in result.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # no step was trained


def test_a_diverging_run_stops_instead_of_saving_nan_weights(tiny_args, tmp_path):
    run = tmp_path / "run"
    result = run_script("scripts/pretrain.py", *tiny_args, "--learning_rate", "1e30", "--warmup_steps", "0",
                        "--max_steps", "6", "--output_dir", str(run), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: training diverged: loss nan at step ")
    assert not (run / "final").exists()


def launch_two(*args, timeout=300, env=None):
    """Two processes on a CPU: torchrun (what `accelerate launch --multi_gpu` runs) with gloo, in `env` (this
    process's environment by default)."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_two_processes_read_disjoint_data(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "docs"
    launch_two("tests/two_process_docs.py", str(corpus), str(tokenizer_dir), str(out))
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    from hf_gpt.data import in_holdout

    assert sorted(seen[0] + seen[1]) == sorted(t for t in texts if not in_holdout(t, 0.1))


def test_two_process_training(tiny_args, tmp_path):
    run = tmp_path / "ddp"
    launch_two("scripts/pretrain.py", *tiny_args, "--max_steps", "3", "--output_dir", str(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["step"] for r in rows if "lr" in r] == [1, 2, 3]  # written once, by the main process
    assert rows[-1]["tokens"] == 3 * 2 * 4 * 64  # steps x processes x micro-batch x block
    assert {"progress_0.pt", "progress_1.pt"} <= {p.name for p in (run / "checkpoints" / "step_00000003").iterdir()}
    AutoModelForCausalLM.from_pretrained(run / "final")


@pytest.mark.skipif(sys.platform != "linux", reason="pgrep finds the launcher's children")
def test_a_process_killed_stops_every_process_with_one_line_and_the_run_resumes_exactly(tiny_args, tmp_path):
    """kill -9 of one process of two: the other stops within seconds with one line (not a traceback of the
    all-reduce it was waiting in), the launcher exits, and --resume on two processes logs what a run never
    stopped logs."""
    args = [*tiny_args, "--max_steps", "80", "--save_every", "10", "--log_every", "5"]
    straight = tmp_path / "straight"
    launch_two("scripts/pretrain.py", *args, "--output_dir", str(straight))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "scripts/pretrain.py", *args, "--output_dir", str(run)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        first = run / "checkpoints" / "step_00000010"
        while time.time() < deadline and launcher.poll() is None and not first.is_dir():
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2 and launcher.poll() is None
        killed = time.time()
        os.kill(int(workers[-1]), signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)
        assert time.time() - killed < 60
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "another process of this run stopped during step" in lines[0], stderr[-3000:]
    assert "Continue with --resume on 2 processes: it starts from" in lines[0]
    assert "[rank0]: Traceback" not in stderr
    assert subprocess.run(["pgrep", "-f", str(run)], capture_output=True).returncode == 1  # no process left
    launch_two("scripts/pretrain.py", *args, "--output_dir", str(run), "--resume")
    assert losses(run) == losses(straight)


def test_summary_records_the_commit_and_whether_the_tree_was_dirty(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hf_gpt.metrics_log import REPO_ROOT, code_version, run_summary

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    assert code_version(tmp_path) == {"git_commit": None, "git_dirty": None}  # not a checkout
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    head = git("rev-parse", "HEAD")
    assert code_version(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"git_commit": head, "git_dirty": True}
    (tmp_path / "inner").mkdir()  # a folder inside a checkout is not a checkout of its own
    assert code_version(tmp_path / "inner") == {"git_commit": None, "git_dirty": None}

    summary = run_summary(PretrainConfig(), SimpleNamespace(num_processes=1, mixed_precision="no"), {"steps": 1}, {})
    assert {k: summary[k] for k in ("git_commit", "git_dirty")} == code_version(REPO_ROOT)
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # no git at all: still a summary
    assert code_version(tmp_path) == {"git_commit": None, "git_dirty": None}
