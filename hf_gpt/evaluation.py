"""Scoring: log-likelihoods of text and of benchmark answers (scripts/compare.py, and the training loop's
evaluation tasks: `EvalTask`).

Scoring follows EleutherAI's lm-evaluation-harness (its `HFLM` model) step for step, so that the
numbers agree with it (docs/compare.md shows the check):

- a (context, continuation) pair is tokenized as one string and split after the context's own
  tokens, so a BPE merge across the boundary comes out as in running text; trailing spaces of the
  context move to the continuation; an empty context becomes the BOS (else EOS) token;
- an input longer than the model's context loses tokens on the left;
- a whole document is scored in windows of the model's context length (`rolling_windows`).

The log-likelihoods are computed here with the model in torch; `load_metric` modules (hf_gpt/metrics,
`evaluate` modules loaded by path, offline) turn them into the reported figures.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .generation import SAMPLED, generate
from .loading import context_length
from .tokenizer import token_byte_lengths

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def prefix_token_id(tokenizer) -> int:
    """What an empty context, and the first window of a document, is conditioned on."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval splits them (see the module docstring)."""
    return encode_pairs(tokenizer, [(context, continuation)])[0]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """encode_pair of every pair, the texts encoded as lists: a fast tokenizer encodes a list in parallel, and
    each distinct context is encoded once (HellaSwag's four endings share theirs). HellaSwag's 40,168 pairs:
    21.2 s one string at a time, 9.4 s as lists (2 CPU cores)."""
    split = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        # A context of only whitespace is empty once its spaces join the continuation: it gets the prefix token
        # too (scored from no token at all, its continuation's first token would have no position to come from).
        stripped = context[:len(context) - spaces]
        split.append((stripped, context[len(stripped):] + continuation))
    contexts = list(dict.fromkeys(context for context, _ in split if context))
    context_ids = dict(zip(contexts, tokenizer(contexts)["input_ids"])) if contexts else {}
    wholes = iter(tokenizer([c + k for c, k in split if c])["input_ids"] if contexts else [])
    prefix = prefix_token_id(tokenizer)
    encoded = []
    for context, continuation in split:
        if context:
            ctx = context_ids[context]
            encoded.append((ctx, next(wholes)[len(ctx):]))
        else:
            cont = tokenizer.encode(continuation, add_special_tokens=False)
            encoded.append(([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:]))
    return encoded


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token of a document exactly once.

    lm-eval's `get_rolling_token_windows` with context_len=1 made disjoint: the first window
    predicts up to max_length tokens after the prefix token; each later window predicts the next
    max_length tokens (fewer at the end), its input filled up with the tokens just before them.
    """
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        windows.append((tokens[end - max_length - 1:done], tokens[done:end]))
        done = end
    return windows


@torch.no_grad()
def score_tokens(model, requests: list[tuple[list[int], list[int]]], *, max_length: int, batch_size: int = 16,
                 desc: str | None = None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation, and
    whether greedy decoding would produce exactly it (every continuation token is the argmax).

    A batch's results are read back once: one host sync a batch, where reading each request's (and copying its
    continuation to the device) took three, 120k for HellaSwag's 40,168 requests, each stalling the GPU."""
    # Longest first, as lm-eval does: similar lengths share a batch, and memory trouble shows at once.
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = order[start:start + batch_size]
        rows = []
        for i in batch:
            context, continuation = requests[i]
            if not 0 < len(continuation) <= max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens: needs 1 to {max_length}")
            rows.append((context + continuation)[-(max_length + 1):][:-1])
        # Right padding, no attention mask: a causal model's real positions never see the padding.
        inputs = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for r, row in enumerate(rows):
            inputs[r, :len(row)] = torch.tensor(row)
        logits = model(input_ids=inputs.to(device)).logits
        continuations = torch.tensor([t for i in batch for t in requests[i][1]]).to(device).split(
            [len(requests[i][1]) for i in batch])
        scored = []
        for r, continuation in enumerate(continuations):
            end = len(rows[r])
            logprobs = F.log_softmax(logits[r, end - len(continuation):end].float(), dim=-1)
            scored.append(torch.stack([logprobs.gather(-1, continuation[:, None]).sum(),
                                       (logprobs.argmax(-1) != continuation).sum().float()]))
        for i, (ll, missed) in zip(batch, torch.stack(scored).tolist()):
            results[i] = (ll, missed == 0)
    return results


def loglikelihood(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16,
                  desc: str | None = None) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood` request: log P(continuation | context) and is-greedy, per pair."""
    requests = encode_pairs(tokenizer, pairs)
    return score_tokens(model, requests, max_length=context_length(model, tokenizer), batch_size=batch_size,
                        desc=desc)


def rolling_loglikelihood(model, tokenizer, texts: list[str], *, batch_size: int = 16,
                          desc: str | None = None) -> list[float]:
    """lm-eval's `loglikelihood_rolling` request: log P(text) of each whole document."""
    max_length, prefix = context_length(model, tokenizer), prefix_token_id(tokenizer)
    requests, owners = [], []
    for i, text in enumerate(texts):
        for window in rolling_windows(tokenizer.encode(text), prefix, max_length):
            requests.append(window)
            owners.append(i)
    totals = [0.0] * len(texts)
    for i, (ll, _) in zip(owners, score_tokens(model, requests, max_length=max_length, batch_size=batch_size,
                                                 desc=desc)):
        totals[i] += ll
    return totals


def load_metric(name: str):
    """One of the project's `evaluate` modules (hf_gpt/metrics/<name>/<name>.py), loaded by path:
    no Hub access, so it works with HF_HUB_OFFLINE=1."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def heldout_loss(model, tokenizer, texts: list[str], *, batch_size: int = 16, desc: str | None = None) -> dict:
    """Loss per token, perplexity and bits per byte of whole documents (rolling windows).

    Bytes are counted with `token_byte_lengths`, as the training loop's val_bpb is; for a byte-level
    BPE they are the texts' UTF-8 bytes, the same for every model, which keeps bpb fair between
    tokenizers (a warning says when a tokenizer breaks that).
    """
    lls = rolling_loglikelihood(model, tokenizer, texts, batch_size=batch_size, desc=desc)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    tokens = [tokenizer.encode(text) for text in texts]
    nbytes = [int(byte_lengths[ids].sum()) for ids in tokens]
    if sum(nbytes) != sum(len(text.encode("utf-8")) for text in texts):
        warnings.warn(f"{tokenizer.name_or_path}: token bytes differ from the text's UTF-8 bytes "
                      "(not a byte-level BPE?); its bits per byte are not comparable", stacklevel=2)
    scores = load_metric("perplexity_bpb").compute(nll=[-ll for ll in lls], units=[len(t) for t in tokens],
                                                   bytes=nbytes)
    return {"val_loss": scores["loss"], "val_ppl": scores["perplexity"], "val_bpb": scores["bits_per_byte"]}


class EvalTask(Protocol):
    """One measure the training loop takes at every evaluation (hf_gpt.engine.evaluate_and_log runs each in
    turn and times it): validation loss, HellaSwag, the samples. docs/evaluation.md says how to add one.

    `run` is called on every process, with the model unwrapped and in eval mode, and returns the fields it
    adds to the metrics row (the same on every process, except main-process-only text such as samples): a
    task that scores a set gives each process a share (data.process_share or records[index::processes]) and
    sums the counts with `accelerator.reduce`. `report` is its console line ('' for none).
    """

    name: str

    def run(self, model, accelerator) -> dict: ...

    def report(self, fields: dict) -> str: ...


class Samples:
    """The continuations of the run's sample prompts, sampled from a fixed seed so that evaluations compare."""

    name = "samples"

    def __init__(self, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int):
        self.tokenizer, self.prompts, self.max_new_tokens, self.seed = tokenizer, prompts, max_new_tokens, seed

    def run(self, model, accelerator) -> dict:
        from accelerate import DistributedType

        # A sharded (FSDP) model generates on every process together: each forward gathers the weights from all.
        sharded = accelerator.distributed_type == DistributedType.FSDP
        if not (accelerator.is_main_process or sharded):
            return {}
        samples = generate(model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens, seed=self.seed,
                           synced_gpus=sharded, **SAMPLED)
        return {"samples": samples} if accelerator.is_main_process else {}

    def report(self, fields: dict) -> str:
        return "\n".join(f"  {prompt!r} -> {text!r}" for prompt, text in zip(self.prompts, fields.get("samples", [])))
