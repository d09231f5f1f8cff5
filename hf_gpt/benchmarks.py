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

from .config import UserError, first_line
from .data import DocumentSource, in_holdout
from .evaluation import encode_pairs, load_metric, loglikelihood, rolling_loglikelihood, score_tokens
from .loading import context_length


@dataclass(frozen=True)
class Benchmark:
    title: str
    path: str  # the Hub dataset lm-eval reads
    name: str | None
    split: str
    forms: tuple[tuple[str, ...], ...]  # the fields a record needs (any one of these sets), in a local file too
    option: str  # the command-line option that takes a local copy

    @property
    def expected(self) -> str:
        return "; or ".join(", ".join(form) for form in self.forms)


BENCHMARKS = {
    # HellaSwag's second form, `ctx` without `ctx_a`/`ctx_b`, is that of copies that kept only the
    # joined context, such as the hellaswag_val.jsonl.xz of docs/results/english/README.md (see hellaswag_item).
    "hellaswag": Benchmark("HellaSwag", "Rowan/hellaswag", None, "validation",
                           (("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                            ("activity_label", "ctx", "endings", "label")), "--hellaswag"),
    "lambada": Benchmark("LAMBADA", "EleutherAI/lambada_openai", "default", "test", (("text",),), "--lambada"),
    "wikitext": Benchmark("WikiText-2", "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test",
                          (("page",),), "--wikitext"),
}

# What `datasets` decompresses by itself when it builds a dataset from a local file.
COMPRESSED = (".gz", ".xz", ".bz2")

# Held-out text by default: FineWeb-Edu's first documents, the head of the stream that configs/gpt2-small.yaml
# holds out (its val_documents, `head` here), so the home-trained model never saw them.
DEFAULT_TEXT = {"name": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "split": "train", "holdout": 0.0,
                "head": 10_000}


def load_benchmark(task: str, file: str | None = None, limit: int | None = None) -> tuple[list[dict], dict]:
    """The task's records (the first `limit`) and a description of where they came from.

    A local `file` is JSON Lines with the Hub dataset's fields, plain or compressed (.gz, .xz, .bz2);
    for WikiText also WikiText's own .raw file, split into pages as the Hub dataset is, or a .txt file,
    taken as a single page.
    """
    spec = BENCHMARKS[task]
    if file:
        path = Path(file)
        if not path.is_file():
            raise UserError(f"{spec.title}: file not found: {file}")
        suffix = _format_suffix(path)
        as_text = task == "wikitext" and suffix in (".txt", ".raw")
        try:  # `datasets` decompresses .gz/.xz/.bz2 files itself
            if as_text:
                text = load_dataset("text", data_files=str(path), split="train", sample_by="document")[0]["text"]
                records = [{"page": page} for page in (wikitext_pages(text) if suffix == ".raw" else [text])]
            else:
                records = list(load_dataset("json", data_files=str(path), split="train"))
        except Exception as e:
            raise UserError(f"{spec.title}: {file} could not be read as {'text' if as_text else 'JSON Lines'}: "
                            f"{first_line(e)}") from None
        source = {"file": str(path)}
    else:
        try:
            records = list(load_dataset(spec.path, spec.name, split=spec.split))
        except Exception as e:  # offline, moved, gated: one line that says what to do instead
            raise UserError(f"{spec.title}: the Hub dataset {spec.path} ({spec.name or 'default'}, {spec.split}) "
                            f"could not be loaded ({type(e).__name__}); pass a local copy with {spec.option} "
                            f"FILE.jsonl (one record per line with fields: {spec.expected})") from None
        source = {"source": spec.path, "config": spec.name, "split": spec.split}
    records = records[:limit] if limit else records
    for i, record in enumerate(records):
        # A JSON Lines file gets one set of columns for all its records: a field a record lacks reads None.
        if not any(all(record.get(f) is not None for f in form) for form in spec.forms):
            raise UserError(f"{spec.title}: record {i + 1} of {file or spec.path} lacks fields "
                            f"(has: {', '.join(f for f in record if record[f] is not None) or 'none'}; "
                            f"expected: {spec.expected})")
    if not records:
        raise UserError(f"{spec.title}: no records in {file or spec.path}")
    return records, {**source, "items": len(records)}


def _format_suffix(path: Path) -> str:
    """The suffix that names a file's format, under any compression: foo.jsonl.gz -> .jsonl,
    wiki.test.raw -> .raw."""
    return path.with_suffix("").suffix if path.suffix in COMPRESSED else path.suffix


def text_documents(name: str, *, config: str = "", split: str = "train", column: str = "text",
                   holdout: float = 0.0, limit: int = 100) -> list[str]:
    """Up to `limit` non-empty documents of a Hub dataset or local files (hf_gpt.data.DocumentSource:
    a .txt file is one document); with `holdout` > 0 only those the trainer holds out by hash."""
    source = DocumentSource(name, config=config, split=split, text_column=column)
    try:
        stream = source.load()
    except UserError as e:
        raise UserError(f"{e}; pass a local text file with --dataset FILE") from None
    documents = []
    try:
        with tqdm(total=limit, desc="held-out documents", leave=False) as bar:
            for example in stream:
                text = example.get(column)
                if text is None:
                    raise UserError(f"dataset {name} has no column '{column}' (it has: {', '.join(example)}); "
                                    "set --text_column")
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
    """(context, endings, gold index): the activity label, then the context, then one of the endings.

    With ctx_a/ctx_b, lm-eval's context. A record with only `ctx` gets it as it is: in HellaSwag `ctx`
    is ctx_a + " " + ctx_b, ctx_b not capitalised ("A man is sitting on a roof. he"), and where ctx_b
    began cannot be told from it, so that fragment stays lower case where lm-eval capitalises it.
    """
    if doc.get("ctx_a") is not None:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    else:
        ctx = doc["ctx"]
    context = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return context, [_hellaswag_clean(ending) for ending in doc["endings"]], int(doc["label"])


def lambada_pair(text: str) -> tuple[str, str]:
    """(passage without its last word, " " + last word), split on single spaces as lm-eval does."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def wikitext_pages(text: str) -> list[str]:
    """A WikiText .raw/.tokens file cut into articles, as EleutherAI/wikitext_document_level (the
    dataset lm-eval's `wikitext` task reads) cuts it: `_generate_examples` of its builder script,
    huggingface.co/datasets/EleutherAI/wikitext_document_level/blob/main/wikitext_document_level.py.
    A page starts at a title line " = Title = "; section headings " = = Section = = " and table
    lines that merely start with " = " (" = National record ") do not start one. Lines are kept as
    they are; text before the first title is a page only if it is more than white space."""
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            if "\n".join(lines).strip():
                pages.append("\n".join(lines))
            lines = []
        lines.append(line)
    return [*pages, "\n".join(lines)]


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
    return score_hellaswag(model, tokenizer, encode_hellaswag(tokenizer, docs), batch_size=batch_size, desc=desc)


def score_hellaswag(model, tokenizer, encoded: tuple, *, batch_size: int = 16, desc: str | None = None) -> dict:
    """run_hellaswag on items encode_hellaswag already tokenized (the training loop scores the same items at every
    evaluation)."""
    requests, lengths, gold = encoded
    results = iter(score_tokens(model, requests, max_length=context_length(model, tokenizer), batch_size=batch_size,
                                desc=desc))
    lls = [[next(results)[0] for _ in endings] for endings in lengths]
    scores = load_metric("multiple_choice_acc").compute(loglikelihoods=lls, lengths=lengths, label=gold)
    return {"hellaswag_acc": scores["acc"], "hellaswag_acc_norm": scores["acc_norm"]}


def encode_hellaswag(tokenizer, docs: list[dict]) -> tuple[list, list[list[int]], list[int]]:
    """Each item's four (context, ending) token-id pairs, its endings' lengths in characters, its gold ending."""
    items = [hellaswag_item(doc) for doc in docs]
    requests = encode_pairs(tokenizer, [(context, " " + ending) for context, endings, _ in items for ending in endings])
    return requests, [[len(e) for e in endings] for _, endings, _ in items], [gold for _, _, gold in items]


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

# OpenAI's GPT-2 124M on HellaSwag's 10,042 validation items as lm-evaluation-harness scores them, the way this
# project scores (docs/compare.md); llm.c's 0.2955 is another protocol (acc_norm per token, raw ctx).
GPT2_124M_HELLASWAG_ACC_NORM = 0.3114
GPT2_124M_HELLASWAG_LABEL = "OpenAI GPT-2 124M, 0.3114 (acc_norm as lm-eval scores it)"


class HellaSwag:
    """HellaSwag in the training loop (an hf_gpt.evaluation.EvalTask): `source` a JSON Lines file (plain or
    .xz/.gz/.bz2) with Rowan/hellaswag's fields, or that Hub dataset's id (its validation split); its first
    `items` records (0: all). Every process scores records[index::processes] with score_hellaswag, tokenized at
    the first evaluation, and the correct answers are summed over processes."""

    name = "hellaswag"

    def __init__(self, source: str, tokenizer, *, items: int = 0, batch_size: int = 16):
        hub = source == BENCHMARKS["hellaswag"].path
        self.records, self.described = load_benchmark("hellaswag", None if hub else source, items or None)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.encoded = None  # this process's share, encode_hellaswag's

    def run(self, model, accelerator) -> dict:
        import torch

        share = self.records[accelerator.process_index::accelerator.num_processes]
        counts = [0.0, 0.0, 0.0]
        if share:
            if self.encoded is None:  # once a run: the same items at every evaluation
                self.encoded = encode_hellaswag(self.tokenizer, share)
            scores = score_hellaswag(model, self.tokenizer, self.encoded, batch_size=self.batch_size)
            counts = [round(scores["hellaswag_acc"] * len(share)), round(scores["hellaswag_acc_norm"] * len(share)),
                      len(share)]
        correct, correct_norm, items = accelerator.reduce(
            torch.tensor(counts, dtype=torch.float64, device=accelerator.device), "sum").tolist()
        return {"hellaswag_acc": correct / items, "hellaswag_acc_norm": correct_norm / items}

    def report(self, fields: dict) -> str:
        return (f"hellaswag acc_norm {fields['hellaswag_acc_norm']:.4f}  acc {fields['hellaswag_acc']:.4f}  "
                f"({len(self.records):,} items; GPT-2 124M {GPT2_124M_HELLASWAG_ACC_NORM})")
