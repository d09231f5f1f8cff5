"""Ablations: which changes to a recipe matter, measured on one token budget.

A base recipe, a list of interventions written as the command-line overrides a user would type
(`no_dropout: --dropout 0.0`), and a budget. The baseline runs with several seeds, which shows the noise;
every intervention runs alone with the first seed; then the stack of the interventions that helped beyond
that noise. Every run is `scripts/pretrain.py` in a process of its own (the product's path, nothing
re-implemented), one per GPU, in `<output_dir>/runs/<name>/`; the report reads their `summary.json` and
`metrics.jsonl`.

Sign convention: Δ = a run's validation loss − the baseline's (the mean of its seeds), so **negative is
better**. (The seed article reports gains: its + is better.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .config import PretrainConfig, UserError, changed_fields, load_config
from .files import atomic_write
from .metrics_log import MetricsLog

PRETRAIN = Path(__file__).resolve().parent.parent / "scripts" / "pretrain.py"

# Set by the ablation for each run: the folder, the seed and the budget are what it varies or holds equal.
OWN_FIELDS = ("config", "output_dir", "resume", "seed", "max_steps", "max_tokens")
# What makes the runs comparable, the same documents read the same way and the same validation: the overrides
# for every run may set these, an intervention may not. (Validation is read in block_size windows, and its
# first eval_batches micro-batches; so those two are held too, see `scored_alike`.)
SHARED_FIELDS = ("dataset", "dataset_weights", "dataset_config", "dataset_split", "text_column", "eval_split",
                 "val_fraction", "val_documents", "data_encoding_errors", "tokenizer", "tokenizer_vocab_size",
                 "tokenizer_train_documents", "eval_batches", "block_size")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STACK = "stack"
# A Δ stands out of the noise when it is larger than this many standard deviations of the baseline's seeds.
NOISE_SIGMAS = 2.0


@dataclass
class Run:
    name: str
    kind: str  # baseline | intervention | stack
    change: str  # the overrides as typed; for a baseline, its seed
    overrides: list[str]
    seed: int
    # What the run gave (filled in when it ends, or read back from a finished run's folder).
    status: str = "pending"  # finished | failed
    error: str = ""
    val_loss: float | None = None
    steps: int | None = None
    tokens: int | None = None
    tokens_per_step: int | None = None
    tokens_per_s: float | None = None
    wall_time_s: float | None = None
    delta: float | None = None
    stands_out: str = ""  # better | worse | "" (within the noise, or not judged)
    hardware: str = ""
    versions: dict = field(default_factory=dict)


def read_interventions(path: str | Path) -> dict[str, str]:
    """`name: overrides` pairs from a YAML file, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"interventions file not found: {path}")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"interventions file {path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(entries, dict) or not entries:
        raise UserError(f"interventions file {path}: expected a mapping of name: overrides, "
                        "e.g. `no_dropout: --dropout 0.0`")
    for name, overrides in entries.items():
        if not isinstance(overrides, str) or not overrides.strip():
            raise UserError(f"interventions file {path}: {name}: expected the overrides as one line of flags, "
                            f"e.g. `{name}: --dropout 0.0`, not {overrides!r}")
    return {str(name): overrides for name, overrides in entries.items()}


def inline_intervention(text: str) -> tuple[str, str]:
    """`--add 'name=--field value ...'` from the command line."""
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip() or not overrides.strip():
        raise UserError(f"--add {text!r}: expected NAME='--field value ...', e.g. --add 'no_dropout=--dropout 0.0'")
    return name.strip(), overrides


FIELDS = {f.name for f in dataclasses.fields(PretrainConfig)}


def flag_fields(tokens: list[str]) -> set[str]:
    """The fields a list of flags names (`--no_tf32` is tf32's; `--max-steps` is max_steps)."""
    names = set()
    for token in tokens:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") and name[3:] in FIELDS else name)
    return names


def resolve(args: list[str], what: str) -> PretrainConfig:
    """The config a run of scripts/pretrain.py with these arguments would train with; bad flags and values
    become one line that says which run they belong to."""
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):  # the parser prints its error before it exits
            return load_config(PretrainConfig, args)
    except SystemExit:
        text = messages.getvalue().strip().removeprefix("error: ") or "not valid flags"
        raise UserError(f"{what}: {text}") from None
    except UserError as e:
        raise UserError(f"{what}: {e}") from None


def tokens_per_step(cfg) -> int:
    """As the engine counts them for one process: a micro-batch is micro_batch_size blocks of block_size."""
    from .engine import accumulation_steps

    return accumulation_steps(cfg, cfg.micro_batch_size * cfg.block_size, 1) * cfg.micro_batch_size * cfg.block_size


def scored_alike(cfg) -> tuple:
    """What the validation of a run reads: block_size windows, and the first eval_batches micro-batches of the
    split (all of it at 0), so another micro_batch_size reads another share unless the whole split is read."""
    return cfg.block_size, cfg.eval_batches * cfg.micro_batch_size


def differences(base, cfg) -> dict[str, str]:
    """The fields `cfg` changes from `base` (a config, or a run's saved config.yaml), as `field old -> new`."""
    return changed_fields(dataclasses.asdict(base) if dataclasses.is_dataclass(base) else base, cfg)


class Ablation:
    """The runs of one ablation, every one of them checked before any starts."""

    def __init__(self, base: str, interventions: dict[str, str], common: list[str], max_tokens: int, seeds: int,
                 output_dir: str | Path):
        if not Path(base).is_file():
            raise UserError(f"base config not found: {base}")
        if max_tokens <= 0:
            raise UserError(f"--max_tokens must be a positive number of tokens per run, not {max_tokens}")
        if seeds < 2:
            raise UserError(f"--seeds {seeds}: the baseline needs 2 seeds or more, or its noise is unknown")
        if not interventions:
            raise UserError("no interventions: give --interventions FILE and/or --add NAME='--field value'")
        self.base, self.common, self.max_tokens = base, list(common), max_tokens
        self.output_dir = Path(output_dir)
        self._configs: dict[str, PretrainConfig] = {}  # run name -> its config (Ablation.config)
        owned = sorted(flag_fields(self.common) & set(OWN_FIELDS))
        if owned:
            raise UserError(f"--{owned[0]}: ablate.py sets it for each run itself (--base is the recipe, --max_tokens "
                            "the budget, --seeds the baseline's seeds, --output_dir the ablation's folder)")
        self.base_cfg = resolve(self._args([], None, None), "the overrides for every run")
        first = self.base_cfg.seed
        self.runs = [Run(f"baseline-seed{first + i}", "baseline", f"seed {first + i}", [], first + i)
                     for i in range(seeds)]
        for name, text in interventions.items():
            self.runs.append(self._intervention(name, text))
        self.fields = {run.name: self._fields(run) for run in self.runs if run.kind == "intervention"}
        for run in self.runs:
            self.check(run)

    def _args(self, overrides: list[str], seed: int | None, folder: Path | None) -> list[str]:
        # The intervention after the overrides for every run, so that it wins where both set a field.
        args = ["--config", self.base, *self.common, *overrides, "--max_steps", "0", "--max_tokens", str(self.max_tokens)]
        if seed is not None:
            args += ["--seed", str(seed)]
        return args + ["--output_dir", str(folder or self.output_dir / "runs" / "_")]

    def args(self, run: Run) -> list[str]:
        """scripts/pretrain.py's arguments for the run."""
        from .checkpoints import checkpoint_dirs  # its imports (torch) only once runs are made

        folder = self.folder(run)
        return self._args(run.overrides, run.seed, folder) + (["--resume"] if checkpoint_dirs(folder) else [])

    def folder(self, run: Run) -> Path:
        return self.output_dir / "runs" / run.name

    def config(self, run: Run) -> PretrainConfig:
        """The run's config, parsed once (a parse builds the whole argument parser: 0.1 s)."""
        if run.name not in self._configs:
            self._configs[run.name] = resolve(self._args(run.overrides, run.seed, self.folder(run)), self.what(run))
        return self._configs[run.name]

    @staticmethod
    def what(run: Run) -> str:
        return {"baseline": "the baseline", "stack": "the stack"}.get(run.kind, f"intervention {run.name}")

    def _intervention(self, name: str, text: str) -> Run:
        if not NAME.fullmatch(name) or name.startswith("baseline") or name == STACK:
            raise UserError(f"intervention {name!r}: a name is letters, digits, '_', '.' or '-' (it names the run's "
                            f"folder), and neither 'baseline...' nor '{STACK}'")
        try:
            tokens = shlex.split(text)
        except ValueError as e:
            raise UserError(f"intervention {name}: {e} in {text!r}") from None
        run = Run(name, "intervention", shlex.join(tokens), tokens, self.base_cfg.seed)
        named = flag_fields(tokens)
        for held, why in ((OWN_FIELDS, "ablate.py sets it for every run"),
                          (SHARED_FIELDS, "every run must read the same documents and be scored alike; set it "
                                          "for every run on ablate.py's command line instead")):
            clash = sorted(named & set(held))
            if clash:
                raise UserError(f"intervention {name}: --{clash[0]}: {why}")
        cfg = self.config(run)
        if not differences(self.base_cfg, cfg):
            raise UserError(f"intervention {name}: {text.strip()} changes nothing from the baseline")
        if scored_alike(cfg) != scored_alike(self.base_cfg):
            raise UserError(f"intervention {name}: its validation would read other sequences (eval_batches "
                            f"{cfg.eval_batches} x micro_batch_size {cfg.micro_batch_size}); pass --eval_batches 0 "
                            "for every run, so that all read the whole validation split")
        return run

    def _fields(self, run: Run) -> set[str]:
        """The fields an intervention sets: those it names, and those it changes (a stack cannot hold two
        interventions that set one field)."""
        return flag_fields(run.overrides) | set(differences(self.base_cfg, self.config(run)))

    def check(self, run: Run) -> None:
        """What every run must pass before it starts: a step within the budget, a folder of its own."""
        self._check_budget(run, self.config(run))
        self.check_folder(run)

    def _check_budget(self, run: Run, cfg) -> None:
        per_step = tokens_per_step(cfg)
        if self.max_tokens < per_step:
            raise UserError(f"{self.what(run)}: one step is {per_step:,} tokens, more than --max_tokens "
                            f"{self.max_tokens:,}")

    def check_folder(self, run: Run) -> None:
        """A run's folder must hold this run or nothing: an earlier ablation's run of other settings is never
        taken for this one's, nor continued with another config."""
        saved = self.folder(run) / "config.yaml"
        if saved.exists():
            changed = differences(yaml.safe_load(saved.read_text()) or {}, self.config(run))
            if changed:
                raise UserError(f"{self.folder(run)} holds a run made with other settings ({', '.join(changed.values())}); "
                                "delete it or choose another --output_dir")

    def stack(self) -> tuple[Run | None, list[str], dict[str, str]]:
        """The run of the interventions that helped, their names, and those left out of it (name -> why).

        Helped: Δ negative and standing out of the noise. Two that set one field cannot both be in: the one with
        the larger gain is taken. A stack of one is that intervention's own run, so none is made.
        """
        helped = sorted((r for r in self.runs if r.kind == "intervention" and r.stands_out == "better"),
                        key=lambda r: r.delta)
        members, left_out = [], {}
        for run in helped:
            clash = next((m for m in members if self.fields[m.name] & self.fields[run.name]), None)
            if clash:
                shared = ", ".join(sorted(self.fields[clash.name] & self.fields[run.name]))
                left_out[run.name] = f"sets {shared} as {clash.name} does, which helped more"
            else:
                members.append(run)
        order = [r for r in self.runs if r in members]  # the file's order
        names = [r.name for r in order]
        if len(order) < 2:
            return None, names, left_out
        overrides = [token for r in order for token in r.overrides]
        return Run(STACK, "stack", " + ".join(names), overrides, self.base_cfg.seed), names, left_out


def read_result(folder: Path) -> dict | None:
    """A finished run's figures from its folder, or None where it has not finished (never started, stopped,
    failed): final/ is written only at the end of a run, summary.json right after."""
    summary_file = folder / "summary.json"
    if not (folder / "final").is_dir() or not summary_file.exists():
        return None
    summary = json.loads(summary_file.read_text())
    if "val_loss" not in summary.get("eval", {}):
        return None
    rates = [r["tokens_per_s"] for r in MetricsLog(folder / "metrics.jsonl").rows() if "tokens_per_s" in r]
    rates = rates[1:] or rates  # the first logged window holds start-up and torch.compile
    return {"val_loss": summary["eval"]["val_loss"], "steps": summary["steps"], "tokens": summary["tokens"],
            "tokens_per_step": summary["tokens_per_step"], "wall_time_s": summary["wall_time_s"],
            "tokens_per_s": statistics.median(rates) if rates else None,
            "hardware": summary.get("hardware", ""), "versions": summary.get("versions", {})}


def failure_line(log: str, returncode: int) -> str:
    """The one line that says why a run failed: its `error:` line, else the last line (a traceback's)."""
    lines = [part.strip() for line in log.splitlines() for part in line.split("\r") if part.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    return lines[-1] if lines else f"exit status {returncode}"


def device_slots(parallel: int | None) -> list[dict]:
    """Where runs go, one run per slot at a time: one GPU each where GPUs are visible (CUDA_VISIBLE_DEVICES
    is set for the run), else shares of this process's CPU cores."""
    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel {parallel}: runs at a time must be 1 or more (0: one per visible GPU)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if gpus:
        n = parallel or len(gpus)
        if n > len(gpus):
            raise UserError(f"--parallel {n}: {len(gpus)} GPU(s) visible, and each run takes one")
        return [{"label": f"GPU {g}", "env": {"CUDA_VISIBLE_DEVICES": g}, "cpus": None} for g in gpus[:n]]
    n = parallel or 1
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if n == 1 or not cpus:
        return [{"label": "CPU", "env": {}, "cpus": None} for _ in range(n)]
    if n > len(cpus):
        raise UserError(f"--parallel {n}: this process may use {len(cpus)} CPU cores, fewer than runs at a time")
    # Each run on its own cores: the engine takes every core it may use, and runs sharing them would crawl.
    return [{"label": f"CPUs {','.join(map(str, cpus[i::n]))}", "env": {}, "cpus": set(cpus[i::n])}
            for i in range(n)]


def execute(ablation: Ablation, runs: list[Run], slots: list[dict], bar) -> None:
    """Run each run's scripts/pretrain.py, as many at a time as there are slots (a run finished by an earlier
    call is read back instead); a failed run is recorded and the rest go on. SIGINT/SIGTERM are passed on to
    the runs, which save a checkpoint and stop: the same command then continues them."""
    from .engine import StopSignal

    pending = []
    for run in runs:
        result = read_result(ablation.folder(run))
        if result:
            record(run, result)
            bar.write(f"{run.name}: finished before, validation loss {run.val_loss:.4f}")
            bar.update()
        else:
            pending.append(run)
    active: dict[int, tuple[Run, subprocess.Popen, float]] = {}
    logs = ablation.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with StopSignal() as stop:
        while pending or active:
            while pending and len(active) < len(slots) and not stop.received:
                run = pending.pop(0)
                i = next(i for i in range(len(slots)) if i not in active)
                active[i] = (run, start(ablation, run, slots[i], logs / f"{run.name}.log"), time.time())
                bar.write(f"{run.name}: started on {slots[i]['label']}")
            for i, (run, process, began) in list(active.items()):
                if process.poll() is None:
                    continue
                del active[i]
                finish(ablation, run, process.returncode, logs / f"{run.name}.log")
                bar.write(f"{run.name}: " + (f"validation loss {run.val_loss:.4f} in {time.time() - began:.0f} s"
                                             if run.status == "finished" else f"failed: {run.error}"))
                bar.update()
            if stop.received:
                for run, process, _ in active.values():
                    process.terminate()
                for run, process, _ in active.values():
                    process.wait()
                raise UserError("stopped by a signal, and with it the runs in progress (one that is training saves "
                                "a checkpoint first): the same command continues them and skips the finished ones")
            time.sleep(0.2)


def start(ablation: Ablation, run: Run, slot: dict, log: Path) -> subprocess.Popen:
    # Plain python, one process: everything the run does is in its config (an Accelerate config file on the
    # machine would otherwise choose the mixed precision of runs that leave it empty), and a failure's last
    # line is its `error:` line.
    env = {**os.environ, **slot["env"], "PYTHONUNBUFFERED": "1"}
    cpus = slot["cpus"]
    command = [sys.executable, str(PRETRAIN), *ablation.args(run)]
    with log.open("w") as out:
        out.write(shlex.join(command) + "\n")
        out.flush()
        return subprocess.Popen(command, stdout=out,
                                stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)


def finish(ablation: Ablation, run: Run, returncode: int, log: Path) -> None:
    result = read_result(ablation.folder(run)) if returncode == 0 else None
    if result:
        record(run, result)
    else:
        run.status = "failed"
        run.error = failure_line(log.read_text(errors="replace"), returncode) if returncode else \
            "ended without a result (stopped by a signal?)"


def record(run: Run, result: dict) -> None:
    run.status = "finished"
    for key, value in result.items():
        setattr(run, key, value)


def judge(runs: list[Run]) -> dict:
    """Δ of every finished run against the mean of the baseline's seeds, and whether it stands out of their
    noise: |Δ| > NOISE_SIGMAS x their standard deviation (n − 1)."""
    seeds = [r.val_loss for r in runs if r.kind == "baseline" and r.status == "finished"]
    if not seeds:
        return {"baseline": None, "std": None, "threshold": None, "seeds": 0}
    mean = statistics.fmean(seeds)
    std = statistics.stdev(seeds) if len(seeds) > 1 else None
    threshold = NOISE_SIGMAS * std if std is not None else None
    for run in runs:
        if run.status != "finished":
            continue
        run.delta = run.val_loss - mean
        if run.kind != "baseline" and threshold is not None and abs(run.delta) > threshold:
            run.stands_out = "better" if run.delta < 0 else "worse"
        else:
            run.stands_out = ""
    return {"baseline": mean, "std": std, "threshold": threshold, "seeds": len(seeds)}


def write_outputs(ablation: Ablation, runs: list[Run], noise: dict, stack: dict, parallel: int) -> list[Path]:
    out = ablation.output_dir
    results = {"base": ablation.base, "overrides_for_every_run": ablation.common, "max_tokens": ablation.max_tokens,
               "noise": {**noise, "rule": f"|delta| > {NOISE_SIGMAS:g} x std of the baseline seeds"},
               "delta": "validation loss - the baseline seeds' mean: negative is better",
               "stack": stack, "runs": [dataclasses.asdict(r) for r in runs]}
    paths = [out / "results.json", out / "report.md", out / "deltas.png"]
    atomic_write(paths[0], json.dumps(results, indent=2) + "\n")
    atomic_write(paths[1], report(ablation, runs, noise, stack, parallel))
    plot_deltas(runs, noise, paths[2])
    return paths


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def report(ablation: Ablation, runs: list[Run], noise: dict, stack: dict, parallel: int) -> str:
    done = [r for r in runs if r.status == "finished"]
    hardware = done[0].hardware if done else "?"
    versions = ", ".join(f"{k} {v}" for k, v in (done[0].versions if done else {}).items())
    command = shlex.join(["python", "scripts/pretrain.py", "--config", ablation.base, *ablation.common,
                          "--max_tokens", str(ablation.max_tokens)])
    lines = [
        f"# Ablation of `{ablation.base}`, {ablation.max_tokens:,} tokens per run", "",
        f"{datetime.now(timezone.utc):%Y-%m-%d}; every run on {hardware}, {parallel} at a time; {versions}.", "",
        f"Every run is `{command}` plus its change (and `--seed`), in `runs/<run>/`; its log in `logs/<run>.log`. "
        f"The interventions and the stack run with the first seed, {ablation.base_cfg.seed}.", "",
    ]
    if noise["baseline"] is None:
        lines += ["**No baseline run finished: nothing to compare against.**", ""]
    else:
        seed_losses = ", ".join(f"{r.val_loss:.4f}" for r in runs if r.kind == "baseline" and r.status == "finished")
        lines += [f"Baseline: {noise['seeds']} seeds, validation loss {seed_losses}; mean **{noise['baseline']:.4f}**"
                  + (f", standard deviation {noise['std']:.4f}." if noise["std"] is not None else ".")]
        lines += ["",
                  "Δ = a run's validation loss − the baseline's mean, in nats per token: **negative is better**. "
                  "(The article reports gains, so its + is better: its +0.050 is our −0.050.)",
                  f"A Δ **stands out** when |Δ| > {NOISE_SIGMAS:g} × the baseline seeds' standard deviation"
                  + (f" = **{noise['threshold']:.4f}**" if noise["threshold"] is not None else
                     " (unknown: fewer than two baseline seeds finished, so nothing is marked)")
                  + "; a smaller one is within what another seed alone would change.", ""]
    lines += ["| run | change | validation loss | Δ vs baseline | stands out | steps × tokens per step | tokens/s |",
              "|---|---|---:|---:|---|---:|---:|"]
    for r in runs:
        change = f"`{r.change}`" if r.kind == "intervention" else r.change
        if r.status != "finished":
            lines.append(f"| {r.name} | {change} | failed: {r.error.replace('|', '/')} | | | | |")
            continue
        mark = {"better": "**better**", "worse": "**worse**"}.get(
            r.stands_out, "—" if r.kind == "baseline" else "within noise" if noise["threshold"] is not None else "")
        lines.append(f"| {r.name} | {change} | {r.val_loss:.4f} | {_num(r.delta, '+.4f')} | {mark} | "
                     f"{r.steps:,} × {r.tokens_per_step:,} | {_num(r.tokens_per_s, ',.0f')} |")
    lines += ["", "tokens/s: the median of the run's logged windows after the first (which holds start-up and "
              "compilation), or of the only one; training only, evaluation and saving left out.", ""]
    if stack["members"] and stack["run"]:
        lines.append(f"**Stack**: {', '.join(stack['members'])}, the interventions whose Δ is negative and stands out.")
    elif stack["members"]:
        lines.append(f"**Stack**: only {stack['members'][0]} stood out as a gain; its own run is the stack.")
    else:
        lines.append("**Stack**: no intervention stood out as a gain, so no stack was run.")
    for name, why in stack["left_out"].items():
        lines.append(f"{name} is left out of it: it {why}.")
    steps = {r.steps for r in done}
    if len(steps) > 1:
        lines += ["", "The budget is fixed in tokens, so a change of tokens per step changes the number of "
                  "optimizer steps too: that is part of what such an intervention measures."]
    lines += ["", "![Δ validation loss against the baseline](deltas.png)", ""]
    return "\n".join(lines)


def plot_deltas(runs: list[Run], noise: dict, png: Path) -> None:
    """One bar per intervention (and the stack), the baseline seeds as dots, the noise band shaded."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt

    rows = [r for r in runs if r.kind != "baseline"]
    fig, ax = plt.subplots(figsize=(7.5, 1.8 + 0.32 * (len(rows) + 1)))
    colors = {"better": "tab:green", "worse": "tab:red", "": "tab:gray"}
    ys = list(range(len(rows), 0, -1))
    ax.barh(ys, [r.delta or 0.0 for r in rows], color=[colors[r.stands_out] for r in rows])
    for y, r in zip(ys, rows):
        text = "failed" if r.status != "finished" else "no baseline" if r.delta is None else f"{r.delta:+.3f}"
        ax.annotate(text, (r.delta or 0.0, y), xytext=(4 if (r.delta or 0) >= 0 else -4, 0), textcoords="offset points",
                    ha="left" if (r.delta or 0) >= 0 else "right", va="center", fontsize=7)
    seeds = [r.delta for r in runs if r.kind == "baseline" and r.delta is not None]
    ax.plot(seeds, [0] * len(seeds), "ko", markersize=4)
    title = "Δ validation loss vs the baseline's mean"
    if noise["threshold"] is not None:
        ax.axvspan(-noise["threshold"], noise["threshold"], color="tab:gray", alpha=0.15)
        title += f"\ngrey band: the noise, ±{NOISE_SIGMAS:g} × std of {noise['seeds']} baseline seeds (dots)"
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks([*ys, 0], [r.name for r in rows] + ["baseline seeds"], fontsize=8)
    ax.margins(x=0.15)  # room for the labels at the ends of the bars
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("Δ (nats/token): negative is better")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
