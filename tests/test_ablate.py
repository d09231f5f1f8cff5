"""scripts/ablate.py end to end on a CPU (a tiny baseline over two seeds, two interventions that help, one that
fails, the stack of the two), its report checked against the runs' own files; and its refusals, before any
run starts."""

import json
import os
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_script
from hf_gpt.ablation import Ablation, Run, judge, read_interventions, report
from hf_gpt.config import UserError
from hf_gpt.metrics_log import MetricsLog

# 4 x 64 tokens a micro-batch, 2 of them a step: 10 steps of 512 tokens in the budget. At this learning rate
# the tiny model learns slowly, so a 5x higher one and twice the steps both help well beyond the seeds' noise.
BASE = """n_layer: 2
n_head: 2
n_embd: 32
block_size: 64
micro_batch_size: 4
gradient_accumulation_steps: 2
learning_rate: 1.0e-3
warmup_steps: 2
dropout: 0.1
val_fraction: 0.1
eval_batches: 2
eval_every: 0
save_every: 0
log_every: 1
mixed_precision: "no"
sample_prompts: ["def "]
"""
INTERVENTIONS = """higher_lr: --learning_rate 5e-3     # a comment, as in configs/ablations/
small_steps: --gradient_accumulation_steps 1
"""
BUDGET = 5120


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "base.yaml"
    path.write_text(BASE)
    return path


def ablate_args(base: Path, corpus, tokenizer_dir, out: Path, *extra: str) -> list[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    interventions = base.parent / "interventions.yaml"
    interventions.write_text(INTERVENTIONS)
    return ["scripts/ablate.py", "--base", str(base), "--interventions", str(interventions), "--max_tokens",
            str(BUDGET), "--seeds", "2", "--output_dir", str(out), "--parallel", str(min(2, cores)),
            "--dataset", str(corpus), "--tokenizer", str(tokenizer_dir), *extra]


@pytest.fixture(scope="module")
def ablation(base, corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "out"
    # A third intervention that fails at run time: flex attention has no backward on a CPU (and no
    # attention dropout, which the base has: refused before any run without --dropout 0).
    result = run_script(*ablate_args(base, corpus, tokenizer_dir, out,
                                     "--add", "flex=--attn_implementation flex_attention --dropout 0"), check=False)
    return {"out": out, "result": result, "report": (out / "report.md").read_text(),
            "results": json.loads((out / "results.json").read_text())}


def test_report_holds_every_run_with_deltas_against_the_baseline_mean(ablation):
    result, results, text = ablation["result"], ablation["results"], ablation["report"]
    assert result.returncode == 1, result.stderr[-3000:]  # one run failed; the report is written all the same
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["baseline-seed1337", "baseline-seed1338", "higher_lr", "small_steps", "flex", "stack"]
    finished = [r for r in runs.values() if r["status"] == "finished"]
    assert len(finished) == 5
    seeds = [runs["baseline-seed1337"]["val_loss"], runs["baseline-seed1338"]["val_loss"]]
    assert seeds[0] != seeds[1]  # another seed, another model
    mean = statistics.fmean(seeds)
    for r in finished:
        folder = ablation["out"] / "runs" / r["name"]
        summary = json.loads((folder / "summary.json").read_text())
        assert r["val_loss"] == summary["eval"]["val_loss"]  # the run's own final evaluation
        assert r["tokens"] == BUDGET  # the same tokens for every run
        assert r["delta"] == pytest.approx(r["val_loss"] - mean, abs=1e-12)  # negative: lower loss, better
        rates = [row["tokens_per_s"] for row in MetricsLog(folder / "metrics.jsonl").rows() if "tokens_per_s" in row]
        assert r["tokens_per_s"] == pytest.approx(statistics.median(rates[1:]))
        # The report's row carries the same figures.
        assert f"| {r['name']} |" in text and f"| {r['val_loss']:.4f} | {r['delta']:+.4f} |" in text
    # The budget is in tokens: half the tokens per step, twice the steps (small_steps, and the stack holding it).
    assert {r["name"]: r["steps"] for r in finished} == {"baseline-seed1337": 10, "baseline-seed1338": 10,
                                                          "higher_lr": 10, "small_steps": 20, "stack": 20}
    assert "**negative is better**" in text and "its + is better" in text


def test_stand_out_marks_follow_the_noise_rule(ablation):
    results = ablation["results"]
    seeds = [r["val_loss"] for r in results["runs"] if r["kind"] == "baseline"]
    threshold = 2 * statistics.stdev(seeds)
    assert results["noise"]["threshold"] == pytest.approx(threshold)
    for r in results["runs"]:
        if r["kind"] == "baseline" or r["status"] != "finished":
            assert r["stands_out"] == ""
        else:
            expected = "" if abs(r["delta"]) <= threshold else "better" if r["delta"] < 0 else "worse"
            assert r["stands_out"] == expected, r
    assert f"= **{threshold:.4f}**" in ablation["report"]


def test_stack_is_made_of_exactly_the_interventions_that_helped(ablation):
    results, out = ablation["results"], ablation["out"]
    helped = [r["name"] for r in results["runs"] if r["kind"] == "intervention" and r["stands_out"] == "better"]
    assert helped == ["higher_lr", "small_steps"]  # what the tiny recipe is built to give
    assert results["stack"]["members"] == helped and results["stack"]["run"]
    stack = yaml.safe_load((out / "runs" / "stack" / "config.yaml").read_text())
    baseline = yaml.safe_load((out / "runs" / "baseline-seed1337" / "config.yaml").read_text())
    changed = {k for k in stack if stack[k] != baseline[k]} - {"output_dir"}
    assert changed == {"learning_rate", "gradient_accumulation_steps"}
    assert stack["learning_rate"] == 5e-3 and stack["gradient_accumulation_steps"] == 1
    assert "**Stack**: higher_lr, small_steps" in ablation["report"]


def test_a_failing_run_is_reported_and_the_rest_go_on(ablation):
    flex = next(r for r in ablation["results"]["runs"] if r["name"] == "flex")
    assert flex["status"] == "failed"
    assert flex["error"] == "flex_attention trains on GPUs only (no backward on CPU); use --attn_implementation sdpa"
    assert f"| flex | `--attn_implementation flex_attention --dropout 0` | failed: {flex['error']} |" in ablation["report"]
    assert "failed: flex" in ablation["result"].stdout


def test_chart_is_written(ablation):
    png = ablation["out"] / "deltas.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "![Δ validation loss against the baseline](deltas.png)" in ablation["report"]


def test_the_same_command_again_skips_the_finished_runs(ablation, base, corpus, tokenizer_dir):
    out = ablation["out"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    # Without the failing intervention, which a re-run would try again.
    again = run_script(*ablate_args(base, corpus, tokenizer_dir, out))
    assert "started" not in again.stdout + again.stderr
    assert again.stdout.count("finished before") == 5
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    before = {r["name"]: r["val_loss"] for r in ablation["results"]["runs"] if r["status"] == "finished"}
    after = {r["name"]: r["val_loss"] for r in json.loads((out / "results.json").read_text())["runs"]}
    assert after == before


def test_a_folder_of_other_settings_is_refused(ablation, base, corpus, tokenizer_dir):
    interventions = read_interventions(base.parent / "interventions.yaml")
    common = ["--dataset", str(corpus), "--tokenizer", str(tokenizer_dir)]
    with pytest.raises(UserError, match=r"baseline-seed1337 holds a run made with other settings \(max_tokens 5120 -> 2560\)"):
        Ablation(str(base), interventions, common, 2560, 2, ablation["out"])


def test_bad_overrides_are_refused_before_anything_runs(base, corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    result = run_script(*ablate_args(base, corpus, tokenizer_dir, out, "--add", "typo=--dropot 0.0"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: intervention typo: unrecognized arguments: --dropot 0.0 (--help lists every field)"
    assert not out.exists()


@pytest.mark.parametrize("interventions, common, message", [
    ({"x": "--dropout 2"}, [], "intervention x: dropout must be between 0 and 1, not 2.0"),
    ({"x": "--learning_rate fast"}, [], "intervention x: argument --learning_rate: invalid float value: 'fast'"),
    ({"x": "--dataset other"}, [], "intervention x: --dataset: every run must read the same documents"),
    ({"x": "--seed 3"}, [], "intervention x: --seed: ablate.py sets it for every run"),
    ({"x": "--dropout 0.1"}, [], "intervention x: --dropout 0.1 changes nothing from the baseline"),
    ({"x": "--micro_batch_size 8"}, [], "intervention x: its validation would read other sequences"),
    ({"x": "--micro_batch_size 64"}, ["--eval_batches", "0"], "intervention x: one step is 8,192 tokens, more than"),
    ({"x": "--crop 'random"}, [], "intervention x: No closing quotation"),
    ({"baseline-2": "--dropout 0.0"}, [], "intervention 'baseline-2': a name is"),
    ({"x": "--dropout 0.0"}, ["--output_dir", "elsewhere"], "--output_dir: ablate.py sets it for each run itself"),
    ({"x": "--dropout 0.0"}, ["--dropot", "0.0"], "the overrides for every run: unrecognized arguments: --dropot"),
])
def test_bad_input_is_one_clear_error(base, tmp_path, interventions, common, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Ablation(str(base), interventions, common, BUDGET, 2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("- --dropout 0.0\n", "expected a mapping of name: overrides"),
    ("no_dropout:\n", "no_dropout: expected the overrides as one line of flags"),
    ("no_dropout: [--dropout, 0.0]\n", "no_dropout: expected the overrides as one line of flags"),
    ("no_dropout: --dropout 0.0\n  bad: indent\n", "not valid YAML"),
])
def test_a_malformed_interventions_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "interventions.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"interventions file {path}: {message}"):
        read_interventions(path)


def test_missing_base_one_seed_and_no_slot_are_refused(base, tmp_path):
    from hf_gpt.ablation import device_slots

    with pytest.raises(UserError, match="--parallel -1: runs at a time must be 1 or more"):
        device_slots(-1)
    with pytest.raises(UserError, match="base config not found: nope.yaml"):
        Ablation("nope.yaml", {"x": "--dropout 0.0"}, [], BUDGET, 2, tmp_path)
    with pytest.raises(UserError, match="--seeds 1: the baseline needs 2 seeds or more"):
        Ablation(str(base), {"x": "--dropout 0.0"}, [], BUDGET, 1, tmp_path)


def fabricated(base, tmp_path, losses: dict[str, float]) -> Ablation:
    """An ablation whose runs carry made-up losses, for the rules alone."""
    interventions = {"wd_small": "--weight_decay 0.01", "wd_large": "--weight_decay 0.3", "no_dropout": "--dropout 0.0",
                     "lr": "--learning_rate 2e-3"}
    ablation = Ablation(str(base), interventions, [], BUDGET, 2, tmp_path)
    for run in ablation.runs:
        run.status, run.val_loss, run.steps, run.tokens_per_step = "finished", losses[run.name], 10, 512
    return ablation


def test_stack_rules_on_made_up_losses(base, tmp_path):
    # Baseline 3.00 and 3.02: mean 3.01, standard deviation 0.0141, so |Δ| > 0.0283 stands out.
    seeds = {"baseline-seed1337": 3.00, "baseline-seed1338": 3.02}
    ablation = fabricated(base, tmp_path, {**seeds, "wd_small": 2.90, "wd_large": 2.95, "no_dropout": 3.05, "lr": 2.99})
    noise = judge(ablation.runs)
    assert noise["threshold"] == pytest.approx(2 * statistics.stdev(seeds.values()))
    marks = {r.name: r.stands_out for r in ablation.runs}
    assert marks == {"baseline-seed1337": "", "baseline-seed1338": "", "wd_small": "better", "wd_large": "better",
                     "no_dropout": "worse", "lr": ""}
    # wd_large helped too but sets weight_decay, as wd_small does, which helped more: a stack of one is no run.
    stack, members, left_out = ablation.stack()
    assert stack is None and members == ["wd_small"] and list(left_out) == ["wd_large"]

    ablation = fabricated(base, tmp_path, {**seeds, "wd_small": 2.95, "wd_large": 3.00, "no_dropout": 3.01, "lr": 2.90})
    judge(ablation.runs)
    stack, members, _ = ablation.stack()
    assert members == ["wd_small", "lr"]  # the file's order
    assert stack.overrides == ["--weight_decay", "0.01", "--learning_rate", "2e-3"]
    assert ablation.config(stack).weight_decay == 0.01 and ablation.config(stack).learning_rate == 2e-3

    ablation = fabricated(base, tmp_path, {**seeds, "wd_small": 3.03, "wd_large": 3.10, "no_dropout": 3.00, "lr": 2.99})
    noise = judge(ablation.runs)
    stack, members, left_out = ablation.stack()
    assert stack is None and members == [] and not left_out
    text = report(ablation, ablation.runs, noise, {"members": members, "left_out": left_out, "run": False}, 1)
    assert "no intervention stood out as a gain, so no stack was run" in text
    assert "| wd_large | `--weight_decay 0.3` | 3.1000 | +0.0900 | **worse** | 10 × 512 |" in text


def test_one_baseline_seed_left_marks_nothing(base, tmp_path):
    ablation = fabricated(base, tmp_path, {"baseline-seed1337": 3.0, "baseline-seed1338": 0, "wd_small": 2.0,
                                           "wd_large": 3.0, "no_dropout": 3.0, "lr": 3.0})
    ablation.runs[1] = Run("baseline-seed1338", "baseline", "seed 1338", [], 1338, status="failed", error="boom")
    noise = judge(ablation.runs)
    assert noise["std"] is None and not any(r.stands_out for r in ablation.runs)
    assert ablation.runs[2].delta == pytest.approx(-1.0)
    assert ablation.stack()[1] == []


def test_the_article_interventions_parse_against_the_seed_recipe(tmp_path):
    """Every entry of configs/ablations/article.yaml with the English run's flags (scripts/ablation_results.sh),
    and its budget a whole number of steps for every run."""
    interventions = read_interventions(ROOT / "configs" / "ablations" / "article.yaml")
    common = ["--dataset", "data/english", "--tokenizer", "data/gpt2-tokenizer", "--max_grad_norm", "0",
              "--compile", "true", "--eval_every", "0", "--eval_batches", "0", "--save_every", "0"]
    ablation = Ablation(str(ROOT / "configs" / "seed-3090.yaml"), interventions, common, 25165824, 3, tmp_path)
    from hf_gpt.ablation import tokens_per_step

    assert {tokens_per_step(ablation.config(r)) for r in ablation.runs} == {6 * 1024, 96 * 1024, 512 * 1024}
    assert all(25165824 % tokens_per_step(ablation.config(r)) == 0 for r in ablation.runs)
    assert len(interventions) == 14  # the article's table (QKV bias taken away), and six more
    assert ablation.config(next(r for r in ablation.runs if r.name == "no_qkv_bias")).qkv_bias is False
    assert ablation.config(next(r for r in ablation.runs if r.name == "muon")).optimizer == "muon"
