"""Multiple-choice accuracy from per-choice log-likelihoods (an `evaluate` module), as
lm-evaluation-harness scores HellaSwag. Loaded by path, offline:
`evaluate.load("hf_gpt/metrics/multiple_choice_acc")`. Self-contained: evaluate copies this file away.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """acc: the choice with the highest summed log-likelihood is the prediction.
acc_norm: the log-likelihood is first divided by the choice's length in characters, so long endings
are not punished for having more tokens (lm-evaluation-harness's acc_norm)."""

_KWARGS_DESCRIPTION = """
Args:
    loglikelihoods: for each item, log P(choice | context) of every choice, summed over its tokens.
    lengths: for each item, the length of every choice in characters (without the leading space).
    label: index of the right choice.
Returns:
    acc, acc_norm: the share of items whose prediction is the label. Ties go to the first choice.
Example:
    >>> metric = evaluate.load("hf_gpt/metrics/multiple_choice_acc")
    >>> metric.compute(loglikelihoods=[[-2.0, -3.0]], lengths=[[1, 6]], label=[1])
    {'acc': 0.0, 'acc_norm': 1.0}
"""


class MultipleChoiceAcc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"loglikelihoods": datasets.List(datasets.Value("float64")),
                                        "lengths": datasets.List(datasets.Value("int64")),
                                        "label": datasets.Value("int64")}),
        )

    def _compute(self, loglikelihoods, lengths, label):
        acc = [np.argmax(lls) == gold for lls, gold in zip(loglikelihoods, label)]
        acc_norm = [np.argmax(np.array(lls) / np.array(n, dtype=float)) == gold
                    for lls, n, gold in zip(loglikelihoods, lengths, label)]
        return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}
