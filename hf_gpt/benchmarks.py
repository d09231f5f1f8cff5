"""Benchmark data and tasks for scripts/compare.py, defined as lm-evaluation-harness defines them.

Each task reads the harness's Hub dataset by default, or a local copy (JSON Lines with the same
fields) so it runs offline, and prepares every document exactly as the harness's task config does
(lm_eval/tasks/{hellaswag,lambada,wikitext}); the scoring itself is in hf_gpt.evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from datasets import load_dataset
from tqdm.auto import tqdm

from .config import UserError
from .data import DocumentSource, in_holdout
from .evaluation import load_metric, loglikelihood, rolling_loglikelihood


@dataclass(frozen=True)
class Benchmark:
    title: str
    path: str  # the Hub dataset lm-eval reads
    name: str | None
    split: str
    fields: tuple[str, ...]  # what each record needs, in a local file too
    option: str  # the command-line option that takes a local copy


BENCHMARKS = {
    "hellaswag": Benchmark("HellaSwag", "Rowan/hellaswag", None, "validation",
                           ("activity_label", "ctx_a", "ctx_b", "endings", "label"), "--hellaswag"),
    "lambada": Benchmark("LAMBADA", "EleutherAI/lambada_openai", "default", "test", ("text",), "--lambada"),
    "wikitext": Benchmark("WikiText", "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test",
                          ("page",), "--wikitext"),
}

# Held-out text by default: FineWeb-Edu documents that configs/gpt2-small.yaml holds out by hash
# (hf_gpt.data.in_holdout), so the home-trained model never saw them.
DEFAULT_TEXT = {"name": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "split": "train", "holdout": 0.0005}


def load_benchmark(task: str, file: str | None = None, limit: int | None = None) -> tuple[list[dict], dict]:
    """The task's records (the first `limit`) and a description of where they came from.

    A local `file` is JSON Lines with the Hub dataset's fields; for WikiText a .txt file is also
    taken, as a single page.
    """
    spec = BENCHMARKS[task]
    if file:
        path = Path(file)
        if not path.is_file():
            raise UserError(f"{spec.title}: file not found: {file}")
        if task == "wikitext" and path.suffix in (".txt", ".raw"):
            records = [{"page": path.read_text(encoding="utf-8")}]
        else:
            try:
                records = list(load_dataset("json", data_files=str(path), split="train"))
            except Exception as e:
                raise UserError(f"{spec.title}: {file} is not JSON Lines: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None
        source = {"file": str(path)}
    else:
        try:
            records = list(load_dataset(spec.path, spec.name, split=spec.split))
        except Exception as e:  # offline, moved, gated: one line that says what to do instead
            raise UserError(f"{spec.title}: the Hub dataset {spec.path} ({spec.name or 'default'}, {spec.split}) "
                            f"could not be loaded ({type(e).__name__}); pass a local copy with {spec.option} "
                            f"FILE.jsonl (one record per line with fields: {', '.join(spec.fields)})") from None
        source = {"source": spec.path, "config": spec.name, "split": spec.split}
    records = records[:limit] if limit else records
    for i, record in enumerate(records):
        missing = [f for f in spec.fields if f not in record]
        if missing:
            raise UserError(f"{spec.title}: record {i + 1} of {file or spec.path} has no field "
                            f"{', '.join(missing)} (expected: {', '.join(spec.fields)})")
    if not records:
        raise UserError(f"{spec.title}: no records in {file or spec.path}")
    return records, {**source, "items": len(records)}


def text_documents(name: str, *, config: str = "", split: str = "train", column: str = "text",
                   holdout: float = 0.0, limit: int = 100) -> list[str]:
    """Up to `limit` non-empty documents of a Hub dataset or local files (hf_gpt.data.DocumentSource:
    a .txt file is one document); with `holdout` > 0 only those the trainer holds out by hash."""
    source = DocumentSource(name, config=config, split=split, text_column=column)
    try:
        stream = source.load()
    except UserError as e:
        raise UserError(f"{e}; pass a local text file with --text FILE") from None
    documents = []
    try:
        with tqdm(total=limit, desc="held-out documents", leave=False) as bar:
            for example in stream:
                text = example.get(column)
                if text is None:
                    raise UserError(f"dataset {name} has no column '{column}' (it has: {', '.join(example)}); "
                                    "set --text-column")
                if text.strip() and (holdout <= 0 or in_holdout(text, holdout)):
                    documents.append(text)
                    bar.update()
                    if len(documents) == limit:
                        break
    except UserError:
        raise
    except Exception as e:  # a stream can also fail after it opened: a bad file, a dropped connection
        raise source.describe_error(e) from None
    if not documents:
        raise UserError(f"no documents in {name}" + (f" held out at {holdout}" if holdout > 0 else ""))
    return documents


# --- lm-eval's task definitions --------------------------------------------------------------

def _hellaswag_clean(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py `preprocess`: WikiHow's bracketed artefacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict) -> tuple[str, list[str], int]:
    """(context, endings, gold index): the activity label, then the context, then one of the endings."""
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return context, [_hellaswag_clean(ending) for ending in doc["endings"]], int(doc["label"])


def lambada_pair(text: str) -> tuple[str, str]:
    """(passage without its last word, " " + last word), split on single spaces as lm-eval does."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def wikitext_detokenize(page: str) -> str:
    """lm_eval/tasks/wikitext/preprocess_wikitext.py: undo WikiText's tokenization artefacts."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for mark in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {mark} ", f"{mark} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def run_hellaswag(model, tokenizer, docs: list[dict], *, batch_size: int = 16, desc: str | None = None) -> dict:
    """Zero-shot, completion style: log P(" " + ending | context) for each ending."""
    items = [hellaswag_item(doc) for doc in docs]
    pairs = [(context, " " + ending) for context, endings, _ in items for ending in endings]
    results = iter(loglikelihood(model, tokenizer, pairs, batch_size=batch_size, desc=desc))
    lls = [[next(results)[0] for _ in endings] for _, endings, _ in items]
    scores = load_metric("multiple_choice_acc").compute(
        loglikelihoods=lls, lengths=[[len(e) for e in endings] for _, endings, _ in items],
        label=[gold for _, _, gold in items])
    return {"hellaswag_acc": scores["acc"], "hellaswag_acc_norm": scores["acc_norm"]}


def run_lambada(model, tokenizer, docs: list[dict], *, batch_size: int = 16, desc: str | None = None) -> dict:
    """acc: greedy decoding reproduces every token of the last word; ppl: exp of its mean loss per passage."""
    pairs = [lambada_pair(doc["text"]) for doc in docs]
    results = loglikelihood(model, tokenizer, pairs, batch_size=batch_size, desc=desc)
    scores = load_metric("perplexity_bpb").compute(nll=[-ll for ll, _ in results], units=[1] * len(results),
                                                   bytes=[len(target.encode()) for _, target in pairs])
    return {"lambada_acc": sum(greedy for _, greedy in results) / len(results), "lambada_ppl": scores["perplexity"]}


def run_wikitext(model, tokenizer, docs: list[dict], *, batch_size: int = 16, desc: str | None = None) -> dict:
    """Word perplexity of whole detokenized pages; words (and bytes) are counted in the original page,
    as lm-eval counts them."""
    pages = [doc["page"] for doc in docs]
    lls = rolling_loglikelihood(model, tokenizer, [wikitext_detokenize(p) for p in pages], batch_size=batch_size,
                                desc=desc)
    scores = load_metric("perplexity_bpb").compute(nll=[-ll for ll in lls],
                                                   units=[len(re.split(r"\s+", p)) for p in pages],
                                                   bytes=[len(p.encode("utf-8")) for p in pages])
    return {"wikitext_word_ppl": scores["perplexity"], "wikitext_bpb": scores["bits_per_byte"]}


RUNNERS = {"hellaswag": run_hellaswag, "lambada": run_lambada, "wikitext": run_wikitext}
