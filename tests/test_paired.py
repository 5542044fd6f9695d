"""Paired comparisons of variants on the same documents (``bitplan.evaluation.paired``)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitplan.evaluation.paired import BETTER, UNRESOLVED, WORSE, Z_95, paired_difference


def documents(values: list[float], task: str = "piqa") -> dict[str, dict[str, float]]:
    return {task: {f"{task}/{i}": v for i, v in enumerate(values)}}


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=50))
def test_a_variant_against_itself_differs_by_exactly_zero(accs):
    result = paired_difference(documents(accs), documents(accs))
    assert result.difference == 0.0 and result.half_width == 0.0
    assert result.verdict == UNRESOLVED and result.documents == len(accs)


@pytest.mark.parametrize(("k", "n"), [(1, 10), (3, 40), (7, 7)])
def test_k_of_n_documents_better_matches_the_hand_computation(k, n):
    """a right and b wrong on k documents, equal on the rest: d is k ones and n - k zeros, mean
    k/n, sample variance (k - k²/n) / (n - 1), interval mean ± 1.96 √(variance / n)."""
    b = [float(i % 2) for i in range(n)]
    a = [1.0 if i < k else b[i] for i in range(n)]
    b = [0.0 if i < k else b[i] for i in range(n)]
    result = paired_difference(documents(a), documents(b))
    mean = k / n
    variance = (k - k * k / n) / (n - 1)
    assert result.difference == pytest.approx(mean)
    assert result.half_width == pytest.approx(1.959963984540054 * math.sqrt(variance / n))
    assert paired_difference(documents(b), documents(a)).difference == pytest.approx(-mean)


def test_tasks_are_averaged_and_their_variances_combined():
    a = documents([1, 1, 0, 0], "piqa") | documents([1, 0], "winogrande")
    b = documents([0, 1, 0, 0], "piqa") | documents([0, 0], "winogrande")
    result = paired_difference(a, b)
    # piqa: d = 1,0,0,0 (mean 1/4, var 1/4 / 4); winogrande: d = 1,0 (mean 1/2, var 1/2 / 2)
    assert result.difference == pytest.approx((0.25 + 0.5) / 2)
    se = math.sqrt((0.25 / 4) + (0.5 / 2)) / 2
    assert result.half_width == pytest.approx(Z_95 * se)
    assert result.documents == 6


def test_verdicts_and_only_shared_documents():
    many = 200
    a, b = documents([1.0] * many), documents([0.0] * (many // 2) + [1.0] * (many // 2))
    assert paired_difference(a, b).verdict == BETTER
    assert paired_difference(b, a).verdict == WORSE
    a["piqa"]["piqa/extra"] = 1.0  # a document only one variant has is left out
    assert paired_difference(a, b).documents == many
    with pytest.raises(ValueError, match="no evaluated document"):
        paired_difference(documents([1.0], "piqa"), documents([1.0], "hellaswag"))
