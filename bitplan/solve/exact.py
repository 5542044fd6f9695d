"""The budgeted choice, solved exactly: one option per unit, least summed score within budget.

Why a Pareto-front DP rather than the reference's DP over a bits grid: the grid must round
costs to its resolution (so the budget is only met approximately) and answers one budget per
run, while the front keeps exact integer bits and answers every budget at once. The front stays
small in practice because real costs repeat (the same few shapes in every block): on 210 units
x 4 options of Llama-8B shapes it has about 20,000 points and takes a fraction of a second.
Where it would not stay small (costs with no common structure, very many options) the DP stops
at a size limit and each budget is solved instead as a MILP by HiGHS with a zero gap, which is
exact too but one budget at a time. Every Solution says which of the two produced it and
whether its optimality was proven.

Exactness: bits are integers throughout and the budget is the floor of target x total weights
computed with fractions, so no plan ever exceeds it. The only floats are the scores, summed in
float64; two plans whose true scores differ by less than that rounding may be ranked either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from numbers import Real
from typing import overload

from bitplan.errors import BitplanError
from bitplan.solve.front import DEFAULT_MAX_FRONT, FrontTooLarge, build_front
from bitplan.solve.milp import solve_milp
from bitplan.solve.problem import Problem, Solution, Unit

Budget = float | int | Fraction


@overload
def solve(
    units: Iterable[Unit],
    avg_bits: Budget,
    pins: Mapping[str, str] | None = None,
    *,
    max_front: int = DEFAULT_MAX_FRONT,
) -> Solution: ...


@overload
def solve(
    units: Iterable[Unit],
    avg_bits: Sequence[Budget],
    pins: Mapping[str, str] | None = None,
    *,
    max_front: int = DEFAULT_MAX_FRONT,
) -> list[Solution]: ...


def solve(
    units: Iterable[Unit],
    avg_bits: Budget | Sequence[Budget],
    pins: Mapping[str, str] | None = None,
    *,
    max_front: int = DEFAULT_MAX_FRONT,
) -> Solution | list[Solution]:
    """The least-score choice within each average-bits budget.

    Give one budget to get one Solution, or a list to get a list in the same order (the front
    is built once for all of them). ``pins`` fixes units to one option; pinned units still count
    in the budget. A budget below the reachable range raises BitplanError; one above it gets the
    least-score choice overall. ``max_front`` is the front size past which each budget is solved
    as a MILP instead.
    """
    single = isinstance(avg_bits, (Real, str))  # a str is refused as a target, not iterated
    targets: list[Budget] = [avg_bits] if single else list(avg_bits)  # type: ignore[list-item]
    problem = Problem.build(units, pins)
    problem.require_scores()
    budgets = [problem.check_reachable(t) for t in targets]
    if not budgets:
        return []
    try:
        front = build_front(problem, max_bits=max(budgets), max_front=max_front)
    except FrontTooLarge:
        solutions = [
            _solve_milp(problem, target, bits)
            for target, bits in zip(targets, budgets, strict=True)
        ]
    else:
        rows = front.picks([front.index_for(b) for b in budgets])
        solutions = [
            problem.solution(list(row), float(t), proven_optimal=True, method="pareto-dp")
            for t, row in zip(targets, rows, strict=True)
        ]
    return solutions[0] if single else solutions


def pareto_front(
    units: Iterable[Unit],
    pins: Mapping[str, str] | None = None,
    *,
    max_front: int = DEFAULT_MAX_FRONT,
) -> list[tuple[float, float]]:
    """Every (average bits, score) point of the exact front, cheapest first, scores falling.

    Each point is the least score reachable at that many bits or fewer. Raises BitplanError if
    the front exceeds ``max_front`` points (use ``solve`` with a list of budgets instead).
    """
    problem = Problem.build(units, pins)
    try:
        front = build_front(problem, max_front=max_front)
    except FrontTooLarge as exc:
        raise BitplanError(
            f"the Pareto front is too large to list ({exc}); solve for a list of budgets instead"
        ) from None
    weights = problem.total_weights
    return [(int(b) / weights, float(s)) for b, s in zip(front.bits, front.scores, strict=True)]


def reachable_range(
    units: Iterable[Unit], pins: Mapping[str, str] | None = None
) -> tuple[float, float]:
    """The lowest and highest average bits any choice (with these pins) can reach."""
    problem = Problem.build(units, pins)
    low, high = problem.cost_range()
    return low / problem.total_weights, high / problem.total_weights


def _solve_milp(problem: Problem, target: Budget, budget_bits: int) -> Solution:
    result = solve_milp(problem, budget_bits)
    return problem.solution(result.picks, float(target), result.proven_optimal, method="milp")
