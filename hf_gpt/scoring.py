"""Replies to SFT's held-out test split, and their scores: ROUGE-L against the reference reply and, when
one is given, an LLM judge behind an OpenAI-compatible API on the article's 0-100 scale. Written to
<output_dir>/test_responses.jsonl, the means into summary.json; scripts/score.py scores such a file again."""

from __future__ import annotations

import functools
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import UserError
from .files import atomic_write
from .generation import generate
from .sft import SFTConfig

# The article's judge prompt (Raschka, ch. 7), for a model served behind an OpenAI-compatible API.
JUDGE_PROMPT = ("Given the input `{instruction}` and correct output `{output}`, score the model response "
                "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")


@functools.cache
def _rouge():
    # evaluate.load("rouge") fetches its loading script from the Hub at run time, which offline machines
    # cannot; that script is a wrapper of this package, so the numbers are the same.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def check_rouge() -> None:
    """Before training: the package rouge_l needs, or one line saying how to get it."""
    try:
        import rouge_score  # noqa: F401  (not _rouge(): its cache would answer for a package since removed)
    except ImportError:
        raise UserError("the test replies are scored with ROUGE-L, which needs the rouge-score package: "
                        "pip install -r requirements.txt (or set --test_fraction 0)") from None


def rouge_l(reference: str, response: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), 0 to 1."""
    return _rouge().score(reference, response)["rougeL"].fmeasure


def judge_score(url: str, model: str, instruction: str, output: str, response: str, timeout: float = 300) -> int | None:
    """The article's 0-100 score from an LLM behind an OpenAI-compatible API (Ollama, vLLM, llama.cpp's
    server); None when the judge's answer holds no number."""
    prompt = JUDGE_PROMPT.format(instruction=instruction, output=output, response=response)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "seed": 123}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):  # hosted endpoints want a key; local servers ignore it
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            answer = json.load(reply)["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        raise UserError(f"judge {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:200]}") from None
    except (urllib.error.URLError, TimeoutError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"judge {url}: {type(e).__name__}: {e}") from None
    number = re.search(r"\d+", answer or "")
    return min(int(number.group()), 100) if number else None


def score_rows(rows: list[dict], judge_url: str = "", judge_model: str = "") -> dict:
    """Adds rougeL (and judge_score with a judge) to every {prompt, reference, response} row; the means."""
    for row in rows:
        row["rougeL"] = rouge_l(row["reference"], row["response"])
    scores = {"test_records": len(rows), "rougeL": float(np.mean([r["rougeL"] for r in rows])) if rows else None}
    if judge_url:
        if not judge_model:
            raise UserError("judge_url needs judge_model (the judge's model name on that server)")
        for row in tqdm(rows, desc="judge", dynamic_ncols=True):
            row["judge_score"] = judge_score(judge_url, judge_model, row["prompt"], row["reference"], row["response"])
        judged = [r["judge_score"] for r in rows if r["judge_score"] is not None]
        scores.update(judge_model=judge_model, judge_score=float(np.mean(judged)) if judged else None,
                      judge_unscored=len(rows) - len(judged))
    return scores


def write_jsonl(rows: list[dict], path: Path) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def answer_test_split(model, tokenizer, chats: list[list[dict]], prompts: list[list[int]], cfg: SFTConfig,
                      path: Path) -> dict:
    """Greedy replies to the test chats (`prompts`: each chat before its reply, tokenized through the template)
    written to `path` (JSON lines), then scored and written again.

    `prompt` is the chat before the reply as the template writes it (for Alpaca: the instruction and
    input under the opening sentence, what the article gave its judge); `reference` is the record's reply.
    """
    replies = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.generation_batch_size)
    rows = [{"prompt": tokenizer.apply_chat_template(chat[:-1], tokenize=False), "reference": chat[-1]["content"],
             "response": reply.strip()} for chat, reply in zip(chats, replies)]
    write_jsonl(rows, path)  # before the judge: replies survive a judge that fails
    scores = score_rows(rows, cfg.judge_url, cfg.judge_model)
    write_jsonl(rows, path)
    return scores


def add_base_replies(base_model, tokenizer, prompts: list[list[int]], cfg: SFTConfig, path: Path) -> None:
    """The base model's greedy replies to the first rows' prompts (tokenized through the tuned model's
    template: the same tokens), added to those rows in `path` as base_response."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    replies = generate(base_model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.generation_batch_size)
    for row, reply in zip(rows, replies):
        row["base_response"] = reply.strip()
    write_jsonl(rows, path)


def add_to_summary(output_dir: Path, key: str, values: dict) -> None:
    """summary.json (written by the engine) gains the test scores, so one file describes the run."""
    path = Path(output_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[key] = values
    atomic_write(path, json.dumps(summary, indent=2))
