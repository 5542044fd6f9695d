"""The reference's comparison recipes: one format everywhere, or whole blocks promoted by depth.

As auto-round's accuracy report defines them: "pure 4-bit" puts every unit at the low option;
"head layers 8-bit" promotes whole decoder blocks to the high option starting from the block
nearest the output; "tail layers 8-bit" starts from the block nearest the embedding. Promotion
moves one block at a time and stops at the first block that would exceed the budget: whole
blocks only, so some budget may be left unused. Units outside the decoder blocks (block None)
stay at the low option. Pinned units keep their pin in every recipe. Scores are summed when
every chosen option has one (nan otherwise); the plans are never called optimal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fractions import Fraction

from bitplan.errors import BitplanError
from bitplan.solve.problem import Problem, Solution, Unit, UnitOptions


def uniform(units: Iterable[Unit], low: str, pins: Mapping[str, str] | None = None) -> Solution:
    """Every unpinned unit at ``low``; its budget is what that costs."""
    problem = Problem.build(units, pins)
    picks = [_index(u, low) for u in problem.units]
    return problem.solution(picks, None, proven_optimal=False, method="uniform")


def promote_blocks(
    units: Iterable[Unit],
    low: str,
    high: str,
    avg_bits: float | int | Fraction,
    pins: Mapping[str, str] | None = None,
    *,
    from_output: bool,
) -> Solution:
    """Promote whole blocks to ``high`` while the budget allows, starting from the block
    nearest the output (``from_output``: the ``head`` recipe) or nearest the embedding (the
    ``tail`` recipe)."""
    problem = Problem.build(units, pins)
    budget = problem.budget_bits(avg_bits)
    picks = [_index(u, low) for u in problem.units]
    promoted = [_index(u, high) for u in problem.units]
    spent = sum(int(u.costs[k]) for u, k in zip(problem.units, picks, strict=True))
    if spent > budget:
        raise BitplanError(
            f"target {avg_bits} bits is below what {low!r} everywhere costs "
            f"({spent / problem.total_weights:.2f} bits)"
        )
    blocks = sorted({u.unit.block for u in problem.units if u.unit.block is not None})
    for block in reversed(blocks) if from_output else blocks:
        members = [i for i, u in enumerate(problem.units) if u.unit.block == block]
        extra = sum(
            int(problem.units[i].costs[promoted[i]]) - int(problem.units[i].costs[picks[i]])
            for i in members
        )
        if spent + extra > budget:
            break
        for i in members:
            picks[i] = promoted[i]
        spent += extra
    return problem.solution(
        picks, float(avg_bits), proven_optimal=False, method="head" if from_output else "tail"
    )


def _index(unit: UnitOptions, option: str) -> int:
    """Where ``option`` sits among the unit's allowed options; a pinned unit keeps its pin."""
    if unit.pinned:
        return 0
    if option not in unit.names:
        known = ", ".join(unit.names)
        raise BitplanError(f"unit {unit.unit.name!r} has no option {option!r} (it has {known})")
    return unit.names.index(option)
