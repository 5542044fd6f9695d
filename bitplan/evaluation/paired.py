"""Paired comparison of two variants evaluated on the same documents.

Two quantized variants of one model agree on most documents, so the uncertainty of the
*difference* of their accuracies is far smaller than the two standard errors combined
(√(se₁² + se₂²) treats them as independent samples). Here each document contributes the
difference of its two scores, d = a − b. For one task, the mean difference has the standard error
sd(d) / √n (sample standard deviation); the five-task average (the mean of the task means, the
reference report's definition) has the variance Σ_t se_t² / T². The interval is the normal one,
mean ± 1.96 standard errors: for 0/1 accuracies this is McNemar's comparison (only the documents
on which the two disagree move it), combined over the tasks.

Documents are ``task -> document key -> measure`` mappings; only documents both variants have are
compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

#: The normal quantile of a two-sided 95 % interval.
Z_95 = 1.959963984540054

#: What a comparison says, by whether its interval excludes 0.
BETTER, WORSE, UNRESOLVED = "better", "worse", "not resolved"


@dataclass(frozen=True)
class PairedDifference:
    """The average over tasks of the mean per-document difference a − b, with the half-width
    of its 95 % interval."""

    difference: float
    half_width: float
    documents: int  # documents compared, over all tasks

    @property
    def verdict(self) -> str:
        """``better`` (a above b) or ``worse`` if the interval excludes 0, else ``not
        resolved``."""
        if self.difference - self.half_width > 0:
            return BETTER
        if self.difference + self.half_width < 0:
            return WORSE
        return UNRESOLVED

    def describe(self, digits: int = 4) -> str:
        return f"{self.difference:+.{digits}f} ± {self.half_width:.{digits}f}"


Documents = Mapping[str, Mapping[str, float]]


def paired_difference(a: Documents, b: Documents, z: float = Z_95) -> PairedDifference:
    """The paired difference of ``a`` and ``b`` (see the module doc), over the tasks both have.
    Raises ValueError if they share no document."""
    means, variances, count = [], [], 0
    for task in a.keys() & b.keys():
        shared = sorted(a[task].keys() & b[task].keys())
        if not shared:
            continue
        d = [a[task][key] - b[task][key] for key in shared]
        n = len(d)
        mean = sum(d) / n
        spread = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        means.append(mean)
        variances.append(spread / n)
        count += n
    if not means:
        raise ValueError("the two variants share no evaluated document")
    tasks = len(means)
    return PairedDifference(sum(means) / tasks, z * math.sqrt(sum(variances)) / tasks, count)
