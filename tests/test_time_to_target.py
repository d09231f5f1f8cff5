"""stop_at_val_loss: the run ends at the first evaluation at or under it, and summary.json says when (time to
target), with evaluation and the first step (compilation) timed apart from training."""

import json
import time

from hf_gpt import engine
from hf_gpt.metrics_log import MetricsLog
from test_engine import rows_without_timing, train_in_process


def evals(run) -> list[dict]:
    return [r for r in MetricsLog(run / "metrics.jsonl").rows() if "val_loss" in r]


def test_a_run_stops_at_its_target_and_reports_the_time_to_it(tiny_args, tmp_path, monkeypatch):
    common = [*tiny_args, "--max_steps", "12", "--eval_every", "2", "--sample_prompts"]
    train_in_process([*common, "--output_dir", str(tmp_path / "whole")])
    whole = evals(tmp_path / "whole")
    target = whole[2]  # step 6
    assert target["step"] == 6 and all(r["val_loss"] > target["val_loss"] for r in whole[:2])

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.5)
        return evaluate(*args, **kwargs)

    evaluate = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", slow_evaluate)
    steps = 0

    def slow_first_step(*args, **kwargs):  # 1 s more, as torch.compile makes the first step slower
        nonlocal steps
        steps += 1
        if steps == 1:
            time.sleep(1.0)
        return optimizer_step(*args, **kwargs)

    optimizer_step = engine.optimizer_step
    monkeypatch.setattr(engine, "optimizer_step", slow_first_step)
    run = tmp_path / "target"
    began = time.perf_counter()
    result = train_in_process([*common, "--stop_at_val_loss", str(target["val_loss"]), "--output_dir", str(run)])
    wall = time.perf_counter() - began
    assert result.steps == 6 and not result.stopped_early and (run / "final").is_dir()
    # The same run as the whole one up to its target, evaluated once there (not again on the way out).
    assert rows_without_timing(run) == rows_without_timing(tmp_path / "whole")[:len(rows_without_timing(run))]
    assert [r["step"] for r in evals(run)] == [2, 4, 6]

    summary = json.loads((run / "summary.json").read_text())
    reached = summary["time_to_target"]
    assert reached["reached"] and reached["stop_at_val_loss"] == target["val_loss"]
    assert (reached["step"], reached["tokens"], reached["val_loss"]) == (6, 6 * 256, target["val_loss"])
    assert reached["train_s"] == evals(run)[-1]["train_s"]
    # Three evaluations of 0.5 s and a first step of 1 s, each reported apart, none of them in train_s.
    assert reached["eval_s"] >= 1.5 and reached["first_step_s"] >= 1.0
    assert 0 < reached["train_s"] < wall - reached["eval_s"] - reached["first_step_s"]
    assert [r["train_s"] for r in evals(run)] == sorted(r["train_s"] for r in evals(run))
    assert summary["first_step_time_s"] == reached["first_step_s"] and summary["train_time_s"] >= reached["train_s"]

    # Resumed, it has reached its target: nothing to train; a lower target trains on.
    args = [*common, "--output_dir", str(run), "--resume"]
    assert train_in_process([*args, "--stop_at_val_loss", str(target["val_loss"])]).steps == 6
    assert train_in_process([*args, "--stop_at_val_loss", "0.01"]).steps == 12


def test_a_target_not_reached_is_null_and_the_run_goes_to_its_end(tiny_args, tmp_path):
    run = tmp_path / "run"
    result = train_in_process([*tiny_args, "--max_steps", "4", "--eval_every", "2", "--stop_at_val_loss", "0.01",
                               "--output_dir", str(run)])
    assert result.steps == 4
    reached = json.loads((run / "summary.json").read_text())["time_to_target"]
    assert reached == {"stop_at_val_loss": 0.01, "reached": False, "step": None, "tokens": None, "val_loss": None,
                       "train_s": None, "first_step_s": None, "eval_s": None, "checkpoint_s": None}


def test_a_run_without_a_target_has_no_time_to_target(tiny_args, tmp_path):
    run = tmp_path / "run"
    train_in_process([*tiny_args, "--max_steps", "2", "--output_dir", str(run)])
    summary = json.loads((run / "summary.json").read_text())
    assert "time_to_target" not in summary and summary["train_time_s"] > 0 and summary["first_step_time_s"] > 0
