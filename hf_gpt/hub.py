"""Publish a run's `final/` model or LoRA `adapter/` on the Hugging Face Hub, with a model card.

    from hf_gpt.hub import push_folder
    url = push_folder("runs/gpt2-small/final", "me/my-gpt2")     # what `pretrain.py --push_to_hub` calls

What happens, in order, so that the cheap failures come first:
1. the token: `token=`, else HF_TOKEN, else `hf auth login`'s file. It is only ever handed to
   huggingface_hub; nothing here writes it anywhere or prints it.
2. `whoami` (the token works, the Hub answers); for a private push, the repo must not exist as a public one.
3. `create_repo(exist_ok=True)`, and the branch for `revision`.
4. the folder loads as a user will load it (transformers, or PEFT for an adapter), and README.md is
   written next to the weights: YAML metadata (license, language, library_name, tags, datasets,
   base_model, model-index) and a body (how it was trained, how to load it, limits); it must parse back.
5. one `upload_folder` commit (to the branch, or as a pull request with `create_pr`).

LoRA runs are trained on a person's own writing: their repos are private unless `private=False`, their
card carries counts only (no text, no prompts, no data paths), and only model and tokenizer files go up.
A LoRA folder says so itself (provenance.json, written when it is saved), so a copy of it anywhere is
treated the same; a folder with neither that nor its run's summary.json is private by default too.
Anything the user can fix is a `UserError`: one line, exit code 2 through `run_cli`.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .config import UserError, first_line

try:  # the HTTP client under huggingface_hub: httpx2 from 2.x on, httpx in 1.x
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
# Written into a LoRA run's adapter/ and merged/ folders: the recipe that made them travels with the folder,
# where ../summary.json does not. It stays on the machine (not in PERSONAL_RUN_FILES).
PROVENANCE_FILE = "provenance.json"
# Only these leave the folder of a personal (LoRA) run: whatever else may be kept there (samples, notes) stays.
PERSONAL_RUN_FILES = ["adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
                      "model*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                      "chat_template.jinja", "README.md"]
DATA_FILE_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".parquet", ".csv", ".arrow")
SECRET_KEY = re.compile(r"key|secret|password|credential|auth|(^|_)token$", re.IGNORECASE)
# results.json keys (scripts/compare.py) -> (task, metric type, metric name) in model-index.
METRICS = {
    "val_loss": ("text", "loss", "held-out loss (nats/token)"),
    "val_ppl": ("text", "perplexity", "held-out perplexity"),
    "val_bpb": ("text", "bits_per_byte", "held-out bits per byte"),
    "hellaswag_acc": ("hellaswag", "accuracy", "HellaSwag acc"),
    "hellaswag_acc_norm": ("hellaswag", "acc_norm", "HellaSwag acc_norm"),
    "lambada_acc": ("lambada", "accuracy", "LAMBADA last-word acc"),
    "lambada_ppl": ("lambada", "perplexity", "LAMBADA perplexity"),
    "wikitext_word_ppl": ("wikitext", "word_perplexity", "WikiText word perplexity"),
    "wikitext_bpb": ("wikitext", "bits_per_byte", "WikiText bits per byte"),
}


@dataclass
class FolderInfo:
    """What the card is made of: the folder itself, and the run it came from when there is one."""

    path: Path
    kind: str  # "model" (config.json) | "adapter" (adapter_config.json)
    summary: dict = field(default_factory=dict)  # ../summary.json of the run; {} for a plain folder
    provenance: dict = field(default_factory=dict)  # the folder's own provenance.json; {} when it has none
    config: dict = field(default_factory=dict)  # ../config.yaml of the run
    model_config: dict = field(default_factory=dict)  # config.json (a model's)
    adapter_config: dict = field(default_factory=dict)  # adapter_config.json (an adapter's)
    parameters: int = 0  # all of a model's; the adapter's own for an adapter
    chat_template: bool = False
    loaded_with: str = ""  # how the check loaded it, for the log

    @property
    def recipe(self) -> str:
        # The folder's own record first: a LoRA folder copied into another run's folder is still personal.
        return (self.provenance.get("recipe") or self.summary.get("recipe")
                or ("lora" if self.kind == "adapter" else ""))

    @property
    def recorded_base(self) -> str | None:
        """The base model the run started from, as recorded: a Hub id or a local path."""
        return self.summary.get("base_model") or self.adapter_config.get("base_model_name_or_path")

    @property
    def personal(self) -> bool:
        """Trained on someone's own writing: LoRA adapters, and models merged from them."""
        return self.recipe == "lora"

    def visibility(self, private: bool | None) -> bool | None:
        """What to ask the Hub for: the caller's choice; else private for personal runs and for folders that do
        not say where they come from (a private repo is made public in one click; a public one may already
        have been copied); else the Hub's default."""
        return True if private is None and (self.personal or not self.recipe) else private

    def upload_patterns(self) -> dict:
        return {"allow_patterns": PERSONAL_RUN_FILES if self.personal else None,
                "ignore_patterns": list(DEFAULT_IGNORE_PATTERNS)}  # a copy: upload_folder extends the list it gets


def hub_id(name: str | None) -> str | None:
    """`name` when it names something on the Hub, None when it is a local path (or nothing)."""
    if not name or name == "stdlib" or name.endswith(DATA_FILE_SUFFIXES) or Path(name).expanduser().exists():
        return None
    return name if REPO_ID.fullmatch(name) else None


def read_folder(folder: str | Path) -> FolderInfo:
    """Kind of folder, plus the run's summary.json and config.yaml next to it when present."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    if (path / "adapter_config.json").is_file():
        kind = "adapter"
    elif (path / "config.json").is_file():
        kind = "model"
    else:
        inside = [p.name for p in (path / "final", path / "adapter") if p.is_dir()]
        hint = f"; this looks like a run folder: pass {path / inside[0]}" if inside else ""
        raise UserError(f"{path} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json){hint}")
    info = FolderInfo(path, kind)
    try:  # a file next to the folder that is not the run's (not a mapping) is ignored
        if (path.parent / "summary.json").is_file():
            info.summary = _mapping(json.loads((path.parent / "summary.json").read_text()))
        if (path.parent / "config.yaml").is_file():
            info.config = _mapping(yaml.safe_load((path.parent / "config.yaml").read_text()))
        if (path / PROVENANCE_FILE).is_file():
            info.provenance = _mapping(json.loads((path / PROVENANCE_FILE).read_text()))
        info.model_config = json.loads((path / "config.json").read_text()) if kind == "model" else {}
        info.adapter_config = json.loads((path / "adapter_config.json").read_text()) if kind == "adapter" else {}
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: a run file does not parse: {first_line(e)}") from None
    return info


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def mark_personal(folder: Path) -> None:
    """Record in `folder` that it was trained on someone's writing, for push_folder to read wherever it is copied."""
    (folder / PROVENANCE_FILE).write_text(json.dumps({
        "recipe": "lora",
        "note": "Trained on someone's own writing: hf-gpt pushes this folder to a private repo unless told "
                "--public, and uploads only its model and tokenizer files. Keep this file with the folder."}, indent=2))


def check_folder(info: FolderInfo) -> None:
    """Load the folder the way a user of the Hub will, so that a broken save fails here, not for them."""
    # Imported here: the token and network checks before this answer in a second, without torch.
    from transformers import AutoTokenizer

    path = info.path
    try:
        if info.kind == "model":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path)
            info.parameters = model.num_parameters()
            info.loaded_with = "AutoModelForCausalLM"
        else:
            from peft import PeftConfig
            from safetensors import safe_open

            PeftConfig.from_pretrained(path)
            weights = path / "adapter_model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{weights.name} is missing")
            with safe_open(weights, "pt") as f:
                info.parameters = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
            info.loaded_with = "PeftConfig and the adapter's safetensors"
            base = info.adapter_config.get("base_model_name_or_path")
            if base and Path(base).expanduser().is_dir():  # the base is here: load the whole thing
                from peft import AutoPeftModelForCausalLM

                AutoPeftModelForCausalLM.from_pretrained(path)
                info.loaded_with = "AutoPeftModelForCausalLM on its local base model"
        if info.kind == "model" or (path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(path)
            info.chat_template = bool(tokenizer.chat_template)
            info.loaded_with += " and AutoTokenizer"
    except Exception as e:  # any failure to load is the same news for the user: the folder is broken
        how = "transformers" if info.kind == "model" else "PEFT"
        raise UserError(f"{path} does not load with {how}: {first_line(e)}") from None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- the model card ---------------------------------------------------------------------------------------


def build_card(info: FolderInfo, repo_id: str, *, results: dict | None = None, license: str = "mit",
               language: list[str] | None = None, base_model: str | None = None,
               revision: str | None = None, private: bool | None = None) -> ModelCard:
    """The README.md of the repo. `results` is scripts/compare.py's results.json; `base_model` a Hub id
    that overrides the one recorded (needed when the run started from a local folder)."""
    base = base_model or hub_id(info.recorded_base)
    datasets = [] if info.personal else [d for d in map(hub_id, info.summary.get("datasets") or []) if d]
    if language is None:
        language = ["code"] if "stdlib" in (info.summary.get("datasets") or []) else ["en"]
    tags = ["hf-gpt", "gpt2", "text-generation"]
    tags += {"pretrain": ["pretrained-from-scratch"], "sft": ["sft", "instruction-tuned"],
             "lora": ["lora", "peft", "personal-style"]}.get(info.recipe, [])
    name = repo_id.split("/")[-1]
    data = ModelCardData(
        license=license, language=language, library_name="peft" if info.kind == "adapter" else "transformers",
        pipeline_tag="text-generation", tags=tags, datasets=datasets or None,
        base_model=base if info.recipe in ("sft", "lora") or info.kind == "adapter" else None,
        model_name=name, eval_results=eval_results(info, results) or None,
    )
    body = "\n".join([f"# {name}", "", _summary_line(info, base), "",
                      *_training_section(info), *_results_section(data.eval_results, results),
                      *_usage_section(info, repo_id, base, revision, private), *_limits_section(info),
                      "<!-- Written by hf-gpt (hf_gpt/hub.py) from the run's summary.json and config.yaml. -->", ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def eval_results(info: FolderInfo, results: dict | None) -> list[EvalResult]:
    """model-index entries: the run's own held-out evaluation, then scripts/compare.py's row for this folder.
    compare.py's held-out text numbers replace the run's own: they are the deliberate measurement."""
    from .benchmarks import BENCHMARKS  # here: it brings datasets and torch, which the token check does without

    rows: list[EvalResult] = []
    own = info.summary.get("eval") or {}
    if not (results and any(k in METRICS and METRICS[k][0] == "text" for k in results["row"])):
        if info.personal:
            dataset = ("own-writing", "held-out share of the owner's writing (not published)")
        elif info.summary.get("datasets") == ["stdlib"]:
            dataset = ("python-stdlib", "Python standard library source (held out)")
        else:
            source = hub_id((info.summary.get("datasets") or [None])[0])
            dataset = (source or "local-text", f"{source or 'local training text'} (held out)")
        for key in ("val_loss", "val_ppl", "val_bpb"):
            if isinstance(own.get(key), (int, float)):
                rows.append(EvalResult(task_type="text-generation", task_name="held-out language modelling",
                                       dataset_type=dataset[0], dataset_name=dataset[1], dataset_split="held-out",
                                       metric_type=METRICS[key][1], metric_name=METRICS[key][2],
                                       metric_value=round(float(own[key]), 4)))
    for key, value in (results or {}).get("row", {}).items():
        if key not in METRICS or not isinstance(value, (int, float)):
            continue  # e.g. tokens/s: a speed, not a result about the model
        task, metric_type, metric_name = METRICS[key]
        rows.append(EvalResult(task_type="text-generation",
                               task_name=BENCHMARKS[task].title if task in BENCHMARKS else "held-out language modelling",
                               metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 4),
                               **_dataset_of(task, results["data"].get("tasks", {}).get(task, {}))))
    return rows


def _dataset_of(task: str, described: dict) -> dict:
    """model-index dataset fields from results.json's description of a task; local files stay unnamed."""
    from .benchmarks import BENCHMARKS

    source = hub_id(described.get("source"))
    if task == "text":
        holdout = f" (held out at {described['holdout']})" if described.get("holdout") else ""
        return {"dataset_type": source or "local/text", "dataset_name": f"{source or 'local text'}{holdout}",
                "dataset_config": described.get("config") if source else None,
                "dataset_split": described.get("split") if source else None}
    spec = BENCHMARKS[task]
    if source:
        return {"dataset_type": source, "dataset_name": spec.title, "dataset_config": described.get("config"),
                "dataset_split": described.get("split")}
    if described.get("file"):  # a local copy: named as one, its path left out
        return {"dataset_type": f"local/{task}", "dataset_name": f"{spec.title} (local copy)"}
    return {"dataset_type": spec.path, "dataset_name": spec.title, "dataset_config": spec.name, "dataset_split": spec.split}


def _summary_line(info: FolderInfo, base: str | None) -> str:
    cfg = info.model_config
    shape = (f"GPT-2: n_layer {cfg.get('n_layer')}, n_head {cfg.get('n_head')}, n_embd {cfg.get('n_embd')}, "
             f"context {cfg.get('n_positions')} tokens, vocabulary {cfg.get('vocab_size'):,}"
             if cfg.get("model_type") == "gpt2" else f"{cfg.get('model_type', 'causal LM')} architecture")
    on = f"`{base}`" if base else "a base model that is not on the Hub"
    if info.kind == "adapter":
        return (f"A LoRA adapter ({info.parameters:,} parameters) for {on}, trained with hf-gpt on its owner's own "
                "writing to continue text in their style.")
    what = {"pretrain": "pretrained from scratch", "sft": f"instruction-tuned from {on}",
            "lora": f"merged from a LoRA adapter on {on}, trained on its owner's own writing"}
    return (f"A {info.parameters:,}-parameter causal language model ({shape}), "
            f"{what.get(info.recipe, 'trained')} with hf-gpt.")


def _training_section(info: FolderInfo) -> list[str]:
    s = info.summary
    if not s:
        return ["## Training", "", "Not recorded: the folder was published without the run's summary.json.", ""]
    if info.personal:  # the LoRA recipe records counts of the writing (documents, tokens); only numbers are shown
        counts = [f"{k.replace('_', ' ')} {v:,}" for k, v in (s.get("writing") or {}).items()
                  if isinstance(v, int) and not isinstance(v, bool)]
        data = "the owner's own writing, not published" + (f" ({', '.join(counts)})" if counts else "")
    else:
        data = ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" if hub_id(d)
                         else "Python's standard library source (hf-gpt's offline corpus)" if d == "stdlib"
                         else "local files (not published)" for d in s.get("datasets") or []) or "—"
    lines = ["## Training", "", "| | |", "|---|---|", f"| recipe | {info.recipe or '—'} |", f"| data | {data} |"]
    for label, key, fmt in (("tokens", "tokens", "{:,}"), ("optimizer steps", "steps", "{:,}"),
                            ("tokens per step", "tokens_per_step", "{:,}"), ("hardware", "hardware", "{}"),
                            ("processes", "num_processes", "{}"), ("mixed precision", "mixed_precision", "{}")):
        if s.get(key) not in (None, ""):
            lines.append(f"| {label} | {fmt.format(s[key])} |")
    if isinstance(s.get("wall_time_s"), (int, float)):
        lines.append(f"| training time | {_duration(s['wall_time_s'])} |")
    if s.get("versions"):
        lines.append(f"| versions | {', '.join(f'{k} {v}' for k, v in s['versions'].items())} |")
    if info.adapter_config:
        a = info.adapter_config
        lines.append(f"| LoRA | r={a.get('r')}, alpha={a.get('lora_alpha')}, dropout={a.get('lora_dropout')}, "
                     f"modules {', '.join(sorted(a.get('target_modules') or []))} |")
    config = _public_config(info)
    if config:
        lines += ["", "Configuration of the run" + (" (settings only: numbers and switches)" if info.personal else "")
                  + ":", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"]
    return [*lines, ""]


def _public_config(info: FolderInfo) -> dict:
    """config.yaml without anything secret-looking; for a personal run, numbers and switches only (no paths,
    prompts or other text of the person's)."""
    out = {}
    for key, value in info.config.items():
        if SECRET_KEY.search(key):
            continue
        if info.personal and not isinstance(value, (int, float, bool)):
            continue
        out[key] = value
    return out


def _results_section(rows: list[EvalResult] | None, results: dict | None) -> list[str]:
    if not rows:
        return []
    lines = ["## Evaluation", "", "| data | metric | value |", "|---|---|---:|"]
    lines += [f"| {r.dataset_name} | {r.metric_name} | {r.metric_value} |" for r in rows]
    if results and results["data"].get("limit"):
        lines += ["", f"Quick run of scripts/compare.py: at most {results['data']['limit']} items per task."]
    return [*lines, "", "Measured by hf-gpt: the run's own held-out evaluation and scripts/compare.py. Lower is "
            "better for loss, perplexity and bits per byte; higher for accuracy.", ""]


def _usage_section(info: FolderInfo, repo_id: str, base: str | None, revision: str | None,
                   private: bool | None) -> list[str]:
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    recorded = info.adapter_config.get("base_model_name_or_path")
    # The base of an adapter: its Hub id, else a placeholder: the folder it was trained on is a path of this
    # machine (a user's name, a project's), and a card publishes no paths.
    base_source = base or "path/to/base-model"
    if info.kind == "adapter" and hub_id(recorded) and base == recorded:
        # adapter_config.json names the base on the Hub: PEFT finds it by itself.
        code = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}"{rev})']
    elif info.kind == "adapter":
        code = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base_source}")'
                + ("" if base else "  # the local base model this adapter was trained on"),
                f'model = PeftModel.from_pretrained(base, "{repo_id}"{rev})']
    else:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev})']
    if info.kind == "model" or (info.path / "tokenizer_config.json").is_file():
        code.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})')
    else:
        code.append(f'tokenizer = AutoTokenizer.from_pretrained("{base_source}")')
    # New tokens to ask for: at most half of the context, so that prompt and answer fit in small models too.
    room = (info.model_config.get("n_positions") or 1024) // 2
    if info.chat_template:
        code += ["", 'messages = [{"role": "user", "content": "Give three tips for staying healthy."}]',
                 "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                 "return_dict=True)",
                 f"outputs = model.generate(**inputs, max_new_tokens={min(100, room)}, do_sample=False)",
                 'print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    else:
        prompts = [] if info.personal else info.config.get("sample_prompts") or []
        prompt = json.dumps(prompts[0] if prompts else "Hello, I'm a language model,")
        code += ["", f'inputs = tokenizer({prompt}, return_tensors="pt")',
                 f"outputs = model.generate(**inputs, max_new_tokens={min(40, room)}, do_sample=True, top_k=50)",
                 "print(tokenizer.decode(outputs[0], skip_special_tokens=True))"]
    access = (["This repository is private: log in first (`hf auth login`, or set `HF_TOKEN`) with an account "
               "that can read it.", ""] if private else [])
    return ["## How to use", "", *access, "```python", *code, "```", ""]


def _limits_section(info: FolderInfo) -> list[str]:
    context = info.model_config.get("n_positions")
    common = [f"- It reads at most {context} tokens of context." if context else None,
              "- It makes things up: nothing it writes is checked against facts. Do not use it for advice, "
              "decisions about people, or anything where a wrong answer does harm.",
              "- It carries the biases and errors of its training text; it had no safety training or human feedback."]
    specific = {
        "pretrain": ["- A small base model trained on far less text than today's models: it continues text, it does "
                     "not follow instructions, and its output drifts after a few sentences."],
        "sft": ["- Instruction-tuned on a small set of examples: it follows simple instructions, often with wrong "
                "or shallow answers, and it does not refuse harmful requests."],
        "lora": ["- It imitates one person's writing style. It may repeat phrases or facts from that writing: keep it "
                 "private unless that person agrees to share it, and never use it to pass text off as theirs."],
    }.get(info.recipe, [])
    return ["## Limits", "", *[line for line in (*specific, *common) if line], ""]


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


# --- checking and pushing ---------------------------------------------------------------------------------


def results_row(path: str | Path, folder: Path) -> dict:
    """scripts/compare.py's results.json, reduced to this folder's row: {"row": {...}, "data": {...}}."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
        models = report["models"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"--results {path}: not a results.json of scripts/compare.py ({type(e).__name__})") from None
    for name, row in models.items():
        if Path(name).expanduser().resolve() == folder.resolve():
            return {"row": row, "data": report.get("data") or {}}
    raise UserError(f"--results {path} has no row for {folder} (it has: {', '.join(models) or 'none'})")


def check_names(repo_id: str, base_model: str | None = None) -> None:
    if not REPO_ID.fullmatch(repo_id):
        raise UserError(f"'{repo_id}' is not a repo id: expected name or owner/name (letters, digits, - _ .)")
    if base_model and not hub_id(base_model):
        raise UserError(f"--base_model '{base_model}' is not a Hub model id (owner/name)")


def prepare_folder(info: FolderInfo, repo_id: str, *, results: dict | None = None, license: str = "mit",
                   language: list[str] | None = None, base_model: str | None = None, revision: str | None = None,
                   private: bool | None = None) -> list[Path]:
    """Check the folder loads, write its README.md and check that it parses; returns the files to upload.
    `results` is this folder's row of a results.json, from `results_row`."""
    check_folder(info)
    if info.recorded_base and not (base_model or hub_id(info.recorded_base)):
        print(f"note: the base model {info.recorded_base} is a local folder, so the card cannot link it: publish it "
              "too and pass --base_model ID")
    # Always rewritten: PEFT's save_pretrained leaves a template README.md naming the base by its local path.
    card_path = info.path / "README.md"
    build_card(info, repo_id, results=results, license=license, language=language, base_model=base_model,
               revision=revision, private=info.visibility(private)).save(card_path)
    try:  # parse it back as the Hub's client will (model-index included)
        ModelCard.load(card_path)
    except Exception as e:
        raise UserError(f"{card_path} does not parse as a model card: {type(e).__name__}: {e}") from None
    # The same selection upload_folder makes with the same patterns: what is listed is what goes up.
    names = sorted(p.relative_to(info.path).as_posix() for p in info.path.rglob("*") if p.is_file())
    return [info.path / n for n in filter_repo_objects(names, **info.upload_patterns())]


@contextmanager
def hub_errors(repo_id: str, endpoint: str):
    """Turn what huggingface_hub raises into one line that says what is wrong and what to do."""
    try:
        yield
    except (OfflineModeIsEnabled, TransportError, HfHubHTTPError, ValueError, RuntimeError) as e:
        # A failed LFS upload arrives as RuntimeError("Error while uploading ...") raised from the real cause.
        cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
        message = _explain(cause, repo_id, endpoint)
        if message is None:
            raise
        raise UserError(message) from None


def _explain(e: BaseException, repo_id: str, endpoint: str) -> str | None:
    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 is set: unset it to publish on the Hub"
    if isinstance(e, TransportError):
        return (f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no answer'}): check the network, a proxy, or HF_ENDPOINT")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        server = (e.server_message or "").strip().splitlines()
        detail = f": {server[0]}" if server else ""
        if status == 401:
            return ("the Hub rejected the token (401 Unauthorized): log in again with `hf auth login --force`, "
                    "or set a valid HF_TOKEN")
        if status == 403:
            return (f"no permission to write to {repo_id} with this token (403 Forbidden{detail}): use a token with "
                    f"write access to '{repo_id.split('/')[0]}' (https://huggingface.co/settings/tokens)")
        return f"the Hub refused the push to {repo_id} (HTTP {status}{detail})"
    if isinstance(e, ValueError):  # huggingface_hub's own checks, e.g. README metadata the Hub rejects
        return f"push to {repo_id} stopped: {' '.join(str(e).split())}"
    return None


def hub_login(repo_id: str, token: str | None = None, *, missing: str = "no Hugging Face token") -> tuple[HfApi, str]:
    """An API client and the user the Hub says the token (given, HF_TOKEN or `hf auth login`'s) belongs to;
    one line when there is no token or the Hub refuses it. `missing` opens the line for a missing token."""
    token = token or get_token()
    if not token:
        raise UserError(f"{missing}: run `hf auth login` or set HF_TOKEN (a token with write access, "
                        "https://huggingface.co/settings/tokens)")
    api = HfApi(token=token)
    with hub_errors(repo_id, api.endpoint):
        return api, api.whoami()["name"]


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                create_pr: bool = False, token: str | None = None, results: str | Path | None = None,
                commit_message: str | None = None, license: str = "mit", language: list[str] | None = None,
                base_model: str | None = None) -> str:
    """Publish `folder` (a run's `final/` or `adapter/`) as `repo_id`; returns the URL to open.

    private: None = the Hub's default (public) for models, private for personal (LoRA) runs; True/False forces.
    revision: a branch to push to (made from main when missing). create_pr: open a pull request against main.
    results: scripts/compare.py's results.json, whose row for this folder goes into the card's model-index.
    token: defaults to HF_TOKEN or the `hf auth login` token; never stored or printed.
    """
    # Cheap checks first (no torch, one request each), so that a missing token or a wrong repo is news in a second.
    if create_pr and revision not in (None, "main"):
        raise UserError("--create_pr opens a pull request against main: leave out --revision")
    check_names(repo_id, base_model)
    info = read_folder(folder)
    row = results_row(results, info.path) if results else None
    if private is None and not info.recipe:
        print(f"note: {info.path} does not say how it was made (no provenance.json, no summary.json next to it): "
              "pushing it private; pass --public to publish it")
    private = info.visibility(private)
    api, user = hub_login(repo_id, token)
    with hub_errors(repo_id, api.endpoint):
        repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
        if private:  # create_repo ignores `private` for a repo that exists: never push private data to a public one
            try:
                public = not api.repo_info(repo_id).private
            except RepositoryNotFoundError:
                public = False
            if public:
                raise UserError(f"{repo_id} already exists and is public: make it private on the Hub first, or pass "
                                "--public to publish there anyway")
        # The repo before the folder check: a permission problem shows in a second, not after loading a large model.
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    files = prepare_folder(info, repo_id, results=row, license=license, language=language,
                           base_model=base_model, revision=revision, private=private)
    print(f"checked {info.path}: loads with {info.loaded_with}; wrote its model card, README.md")
    with hub_errors(repo_id, api.endpoint):
        total = sum(f.stat().st_size for f in files)
        print(f"uploading {len(files)} files ({total / 1e6:.1f} MB) from {info.path} to {repo_id}"
              f"{' (private)' if private else ''}{f' @ {revision}' if revision else ''}"
              f"{' as a pull request' if create_pr else ''}:")
        for f in files:
            print(f"  {f.relative_to(info.path).as_posix():32s} {f.stat().st_size:>14,} bytes")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=info.path, revision=revision, create_pr=create_pr, **info.upload_patterns(),
            commit_message=commit_message or f"Upload {'LoRA adapter' if info.kind == 'adapter' else 'model'} "
                                             f"({info.recipe or 'model'}) with hf-gpt")
    if create_pr:
        return commit.pr_url
    return f"{repo_url}/tree/{revision}" if revision and revision != "main" else str(repo_url)
