"""Perplexity and bits per byte from summed negative log-likelihoods (an `evaluate` module).

Loaded by path, offline: `evaluate.load("hf_gpt/metrics/perplexity_bpb")`. Self-contained on purpose:
evaluate copies this file into its module cache, away from the hf_gpt package.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """Weighted perplexity, as lm-evaluation-harness aggregates it: exp(sum(nll) / sum(units)).
The unit decides what the perplexity is per: tokens (held-out loss), words (WikiText word perplexity)
or 1 per item (LAMBADA's perplexity, exp of the mean per-passage loss). Bits per byte divide the same
nats by ln 2 and by the UTF-8 bytes of the scored text, which makes models with different tokenizers
comparable."""

_KWARGS_DESCRIPTION = """
Args:
    nll: negative log-likelihood of each item, summed over its tokens, in nats.
    units: what the perplexity is per, counted for each item (tokens, words, or 1).
    bytes: UTF-8 bytes of the scored text of each item.
Returns:
    loss: sum(nll) / sum(units), nats per unit.
    perplexity: exp(loss).
    bits_per_byte: sum(nll) / ln(2) / sum(bytes).
Example:
    >>> metric = evaluate.load("hf_gpt/metrics/perplexity_bpb")
    >>> metric.compute(nll=[2.0, 4.0], units=[2, 4], bytes=[3, 3])["loss"]
    1.0
"""


class PerplexityBpb(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "units": datasets.Value("int64"),
                                        "bytes": datasets.Value("int64")}),
        )

    def _compute(self, nll, units, bytes):
        total = math.fsum(nll)
        loss = total / sum(units)
        return {"loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": total / math.log(2) / sum(bytes) if sum(bytes) else float("nan")}
