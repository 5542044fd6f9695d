"""Fallback for fronts too large to hold: one exact MILP per budget, solved by HiGHS.

Binary x[u, k] = 1 when unit u takes option k; one option per unit; total bits within the
budget; minimise the summed score. The bits row is written in whole multiples of the costs'
common divisor (relative to each unit's cheapest option), so its right-hand side is an integer
and HiGHS's feasibility tolerance cannot let a whole extra multiple through. The choice read
back is re-counted in integers all the same; should it overshoot (a tolerance gone wrong), the
row is tightened by the overshoot and solved again, and the result is no longer called proven.
Scores are shifted and scaled so that HiGHS's fixed absolute gap (1e-6) is negligible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from bitplan.errors import BitplanError
from bitplan.solve.front import dominance_pruned
from bitplan.solve.problem import Problem

_SCORE_SCALE = 1e6  # largest objective coefficient after scaling
_RETRIES = 3


@dataclass(frozen=True)
class MilpResult:
    picks: list[int]  # option index per unit
    proven_optimal: bool  # HiGHS reported optimal with zero gap, first time, within the budget


def solve_milp(problem: Problem, budget_bits: int, time_limit: float | None = None) -> MilpResult:
    """The best choice within ``budget_bits``; the budget must be reachable (checked before)."""
    problem.require_scores()
    allowed = [dominance_pruned(u) for u in problem.units]
    picks = [int(a[0]) for a in allowed]
    free = [i for i, a in enumerate(allowed) if len(a) > 1]  # units with a real choice
    if not free:
        return MilpResult(picks, proven_optimal=True)

    extra_bits: list[int] = []
    extra_scores: list[float] = []
    owner: list[int] = []
    for row, i in enumerate(free):
        unit, a = problem.units[i], allowed[i]
        extra_bits.extend(int(c) - int(unit.costs[a[0]]) for c in unit.costs[a])
        extra_scores.extend(unit.scores[a] - unit.scores[a].min())
        owner.extend([row] * len(a))
    divisor = math.gcd(*extra_bits) or 1
    base_bits = sum(int(u.costs[k]) for u, k in zip(problem.units, picks, strict=True))
    room = (budget_bits - base_bits) // divisor
    bits_row = np.array([b // divisor for b in extra_bits], dtype=np.float64)
    scores = np.array(extra_scores, dtype=np.float64)
    if scores.max() > 0:  # divided first: _SCORE_SCALE / a subnormal maximum overflows
        scores = scores / scores.max() * _SCORE_SCALE

    n_vars = len(owner)
    one_each = csr_array(
        (np.ones(n_vars), (np.array(owner), np.arange(n_vars))), shape=(len(free), n_vars)
    )
    options: dict[str, float] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = time_limit
    for attempt in range(_RETRIES):
        result = milp(
            c=scores,
            integrality=np.ones(n_vars),
            bounds=Bounds(0, 1),
            constraints=[
                LinearConstraint(one_each, 1, 1),
                LinearConstraint(bits_row[None, :], -np.inf, room),
            ],
            options=options,
        )
        if result.x is None:
            raise BitplanError(f"the MILP solver found no plan within the budget: {result.message}")
        start = 0
        for i in free:
            width = len(allowed[i])
            picks[i] = int(allowed[i][int(np.argmax(result.x[start : start + width]))])
            start += width
        spent = sum(int(u.costs[k]) for u, k in zip(problem.units, picks, strict=True))
        if spent <= budget_bits:
            return MilpResult(picks, proven_optimal=result.status == 0 and attempt == 0)
        room -= -(-(spent - budget_bits) // divisor)  # tighten by the overshoot, rounded up
    raise BitplanError(
        f"the MILP solver kept returning plans over the budget ({spent} > {budget_bits} bits)"
    )
