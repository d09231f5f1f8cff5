"""Check that scripts/compare.py gives the numbers EleutherAI's lm-evaluation-harness gives, offline, on a CPU.

    python -m venv --system-site-packages /tmp/lmeval && /tmp/lmeval/bin/pip install "lm-eval>=0.4.13"
    /tmp/lmeval/bin/python scripts/crosscheck_lm_eval.py                       # ~2 minutes on 2 cores
    /tmp/lmeval/bin/python scripts/crosscheck_lm_eval.py --tokenizer DIR       # e.g. GPT-2's own BPE

No Hub access is needed. Into --output_dir it writes:
- a small GPT-2 (128 positions, so documents span several rolling windows),
  trained for a few hundred steps on CPython's own documentation (pydoc_data) with a BPE learnt
  on it, and a LoRA adapter trained on top of it;
- local copies of the tasks in the Hub datasets' formats, made from documentation the models did
  not train on: HellaSwag (Rowan/hellaswag fields, WikiHow's [title] artefacts included), LAMBADA
  (lambada_openai), WikiText pages (wikitext_document_level, with WikiText's " @-@ " artefacts) and
  held-out text documents.

Then it scores both models twice: with lm-eval's own task configs (hellaswag, lambada_openai,
wikitext; `include`d and pointed at the local files) and with scripts/compare.py, and compares
(1) every request: the context/continuation strings must be identical and the log-likelihoods equal
to within --atol, and (2) every reported figure, to within --rtol. Exit status 1 if anything disagrees.
lm-eval is only needed here (requirements-optional.txt), never by hf_gpt itself.
"""

import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, no install needed

import torch  # noqa: E402

from hf_gpt.benchmarks import hellaswag_item, lambada_pair, wikitext_detokenize  # noqa: E402
from hf_gpt.config import ScriptParser  # noqa: E402
from hf_gpt.evaluation import loglikelihood, rolling_loglikelihood  # noqa: E402
from hf_gpt.loading import load_model, load_tokenizer  # noqa: E402
from hf_gpt.tokenizer import train_bpe  # noqa: E402

# lm-eval's figure for each of ours: (lm-eval task, lm-eval metric key).
FIGURES = {
    "val_bpb": ("text_local", "bits_per_byte,none"),
    "hellaswag_acc": ("hellaswag_local", "acc,none"),
    "hellaswag_acc_norm": ("hellaswag_local", "acc_norm,none"),
    "lambada_acc": ("lambada_local", "acc,none"),
    "lambada_ppl": ("lambada_local", "perplexity,none"),
    "wikitext_word_ppl": ("wikitext_local", "word_perplexity,none"),
    "wikitext_bpb": ("wikitext_local", "bits_per_byte,none"),
}


def paragraphs() -> list[tuple[str, str]]:
    """(topic, paragraph) pairs of plain English prose from CPython's documentation, on every machine."""
    from pydoc_data.topics import topics

    out = []
    for topic, text in sorted(topics.items()):
        for para in text.split("\n\n"):
            words = para.split()
            if len(words) >= 20 and len(para) - len(para.lstrip(" ")) <= 3:  # prose and notes; code is indented more
                out.append((topic, " ".join(words)))
    return out


def train(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int) -> None:
    """Next-token training on random 128-token windows of the concatenated texts: enough to make the
    model's choices far from uniform, so that agreement means something."""
    ids = torch.tensor([t for text in texts for t in [tokenizer.eos_token_id, *tokenizer.encode(text)]])
    block = model.config.n_positions
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block, (16,), generator=gen)
        batch = torch.stack([ids[s:s + block] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    print(f"  trained {steps} steps, last loss {loss.item():.3f}")


def wikitext_style(text: str) -> str:
    """Re-tokenize prose the way WikiText is, so the harness's detokenizer has work to do."""
    for mark in (",", ".", ";", ":"):
        text = text.replace(f"{mark} ", f" {mark} ")
    return text.replace("-", " @-@ ").replace("(", "( ").replace(")", " )")


def make_data(folder: Path, held_out: list[tuple[str, str]], seed: int) -> dict[str, Path]:
    rng = random.Random(seed)
    files = {name: folder / f"{name}.jsonl" for name in ("hellaswag", "lambada", "wikitext", "text")}
    with files["hellaswag"].open("w") as f:
        for i, (topic, para) in enumerate(held_out[:150]):
            words = para.split()
            others = rng.sample([p for _, p in held_out if p != para], 3)
            endings = [" ".join(words[15:15 + rng.randint(4, 14)])] + [
                " ".join(p.split()[15:15 + rng.randint(4, 14)]) for p in others]
            gold = i % 4
            endings.insert(gold, endings.pop(0))
            if i % 5 == 0:  # WikiHow-style artefacts that lm-eval's preprocess removes
                endings[1] = "[header] " + endings[1] + " [title] step"
            ctx_b = "" if i % 3 == 0 else " ".join(words[12:15])
            f.write(json.dumps({"ind": i, "activity_label": topic, "ctx_a": " ".join(words[:12]), "ctx_b": ctx_b,
                                "endings": endings, "label": str(gold), "split": "val"}) + "\n")
    with files["lambada"].open("w") as f:
        for _, para in held_out[:300]:
            f.write(json.dumps({"text": " ".join(para.split()[:rng.randint(25, 60)])}) + "\n")
    with files["wikitext"].open("w") as f:
        for k in range(10):
            group = held_out[k * 6:(k + 1) * 6]
            page = f" = {group[0][0]} = \n \n" + "".join(f" {wikitext_style(p)} \n" for _, p in group)
            f.write(json.dumps({"page": page}) + "\n")
    with files["text"].open("w") as f:
        for k in range(20):
            f.write(json.dumps({"text": "\n\n".join(p for _, p in held_out[60 + k * 3:63 + k * 3])}) + "\n")
    return files


def task_configs(folder: Path, files: dict[str, Path]) -> None:
    """lm-eval's own task configs, `include`d unchanged but for the data source: local JSON Lines."""
    import lm_eval

    tasks = Path(lm_eval.__file__).parent / "tasks"
    included = {"hellaswag": (tasks / "hellaswag/hellaswag.yaml", "validation"),
                "lambada": (tasks / "lambada/lambada_openai.yaml", "test"),
                "wikitext": (tasks / "wikitext/wikitext.yaml", "test")}
    for name, (yaml, split) in included.items():
        (folder / f"{name}_local.yaml").write_text(
            f"task: {name}_local\ninclude: {yaml}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {files[name]}\n"
            "training_split: null\nvalidation_split: " + ("validation" if split == "validation" else "null") + "\n"
            f"test_split: {'null' if split == 'validation' else 'test'}\n")
    # Held-out text has no lm-eval task: the same rolling log-likelihood request as wikitext, on raw text.
    (folder / "text_local.yaml").write_text(
        f"task: text_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {files['text']}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")


def run_lm_eval(folder: Path, model_dir: Path, adapter_dir: Path | None):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), peft=str(adapter_dir) if adapter_dir else None, batch_size=8,
              device="cpu", dtype="float32")
    out = lm_eval.simple_evaluate(model=lm, tasks=["text_local", "hellaswag_local", "lambada_local", "wikitext_local"],
                                  task_manager=TaskManager(include_path=str(folder)), log_samples=True)
    return out["results"], out["samples"]


def request_check(name: str, samples: dict, files: dict[str, Path]) -> list[dict]:
    """Our requests and log-likelihoods against lm-eval's, one by one."""
    model, tokenizer = load_model(name)
    rows = []

    def compare(task, ours_args, ours_lls, theirs_args, theirs_lls, greedy=None):
        rows.append({"task": task, "requests": len(ours_args), "same_strings": ours_args == theirs_args,
                     "max_abs_ll_diff": max(abs(a - b) for a, b in zip(ours_lls, theirs_lls)),
                     **({"same_greedy": greedy} if greedy is not None else {})})

    def records(task):
        return [json.loads(line) for line in files[task].read_text().splitlines()]

    # HellaSwag: lm-eval logs 4 (context, " ending") requests per document.
    s = sorted(samples["hellaswag_local"], key=lambda x: x["doc_id"])
    theirs = [tuple(a) for x in s for a in x["arguments"]]
    ours = [(ctx, " " + e) for ctx, endings, _ in map(hellaswag_item, records("hellaswag")) for e in endings]
    compare("hellaswag", ours, [ll for ll, _ in loglikelihood(model, tokenizer, ours)], theirs,
            [r[0] for x in s for r in x["filtered_resps"]])
    s = sorted(samples["lambada_local"], key=lambda x: x["doc_id"])
    ours = [lambada_pair(r["text"]) for r in records("lambada")]
    res = loglikelihood(model, tokenizer, ours)
    compare("lambada", ours, [ll for ll, _ in res], [tuple(x["arguments"][0]) for x in s],
            [x["filtered_resps"][0][0] for x in s],
            greedy=[g for _, g in res] == [x["filtered_resps"][0][1] for x in s])
    for task, key, prepare in (("wikitext", "page", wikitext_detokenize), ("text", "text", str)):
        s = sorted(samples[f"{task}_local"], key=lambda x: x["doc_id"])
        ours = [prepare(r[key]) for r in records(task)]
        compare(task, ours, rolling_loglikelihood(model, tokenizer, ours), [x["arguments"][0][0] for x in s],
                [x["filtered_resps"][0] for x in s])
    return rows


def main():
    p = ScriptParser(description=__doc__, renamed={"workdir": "output_dir", "steps": "max_steps"})
    p.add_argument("--output_dir", help="Where models and data go (default: a temporary folder).")
    p.add_argument("--tokenizer", help="A tokenizer folder to use instead of a BPE learnt here.")
    p.add_argument("--max_steps", type=int, default=300, help="Training steps of the small model.")
    p.add_argument("--rtol", type=float, default=1e-4, help="Largest relative difference of a figure.")
    p.add_argument("--atol", type=float, default=1e-3, help="Largest difference of one log-likelihood (nats).")
    args = p.parse_args()
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="crosscheck-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    paras = paragraphs()
    random.Random(0).shuffle(paras)
    train_texts, held_out = [p for _, p in paras[:-300]], paras[-300:]
    print(f"workdir {work}: {len(train_texts)} training paragraphs, {len(held_out)} held out")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else train_bpe(iter(train_texts), 1024, 10**6)
    from transformers import GPT2Config, GPT2LMHeadModel

    # Exactly the tokenizer's size, not padded as the trainer pads: lm-eval's PEFT loader shrinks a larger
    # embedding to the tokenizer's size, which would put it on another model than ours (docs/compare.md).
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=96, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    print("model:")
    train(model, tokenizer, train_texts, args.max_steps, 3e-3, seed=0)
    model_dir, adapter_dir = work / "model", work / "adapter"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(model_dir),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                           task_type="CAUSAL_LM"))
    print("LoRA adapter:")
    train(peft_model, tokenizer, train_texts[-300:], args.max_steps // 3, 1e-2, seed=1)
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)

    files = make_data(work, held_out, seed=0)
    task_configs(work, files)
    out = work / "compare"
    cmd = [sys.executable, str(ROOT / "scripts/compare.py"), str(model_dir), str(adapter_dir), "--output_dir", str(out),
           "--tasks", "text,hellaswag,lambada,wikitext", "--dataset", str(files["text"]), "--batch_size", "8",
           *[arg for task in ("hellaswag", "lambada", "wikitext") for arg in (f"--{task}", str(files[task]))]]
    subprocess.run(cmd, check=True, cwd=ROOT)
    ours = json.loads((out / "results.json").read_text())["models"]

    import lm_eval

    report = {"lm_eval": lm_eval.__version__, "versions": json.loads((out / "results.json").read_text())["versions"],
              "models": {}}
    ok = True
    for name, adapter in ((model_dir, None), (adapter_dir, adapter_dir)):
        label = "adapter" if adapter else "model"
        results, samples = run_lm_eval(work, model_dir, adapter)
        figures = {}
        for key, (task, metric) in FIGURES.items():
            a, b = results[task][metric], ours[str(name)][key]
            figures[key] = {"lm_eval": a, "hf_gpt": b, "agree": math.isclose(a, b, rel_tol=args.rtol, abs_tol=1e-12)}
        requests = request_check(str(name), samples, files)
        ok &= all(f["agree"] for f in figures.values())
        ok &= all(r["same_strings"] and r["max_abs_ll_diff"] <= args.atol and r.get("same_greedy", True)
                  for r in requests)
        report["models"][label] = {"figures": figures, "requests": requests}

    print(f"\n{'':8} {'figure':20} {'lm-eval':>14} {'hf-gpt':>14}  agree")
    for label, r in report["models"].items():
        for key, f in r["figures"].items():
            print(f"{label:8} {key:20} {f['lm_eval']:14.6f} {f['hf_gpt']:14.6f}  {'yes' if f['agree'] else 'NO'}")
    print(f"\n{'':8} {'task':10} {'requests':>8}  same strings  max |Δ loglik|")
    for label, r in report["models"].items():
        for q in r["requests"]:
            print(f"{label:8} {q['task']:10} {q['requests']:8}  {'yes' if q['same_strings'] else 'NO':12}  "
                  f"{q['max_abs_ll_diff']:.2e}" + (f"  same greedy: {q['same_greedy']}" if "same_greedy" in q else ""))
    (work / "crosscheck.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {work / 'crosscheck.json'}; lm-eval {lm_eval.__version__}: {'AGREE' if ok else 'DISAGREE'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
