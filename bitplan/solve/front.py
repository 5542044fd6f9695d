"""The exact Pareto front of (total bits, total score) by dynamic programming over units.

After the first k units, the DP holds every choice for those k units that no other choice beats
on both bits and score: sorted by bits, with scores strictly falling. Adding unit k+1 offers each
kept point with each of the unit's options; the offers are merged and the dominated ones dropped.
A point dropped there can never be part of an optimum (swapping in the point that dominates it
gives a plan that costs no more and loses no more), so the final set is the whole exact front,
and the best plan for any budget is its last point that fits. Each point keeps a pointer to the
point it came from and the option it added, so any plan on the front can be read back.

Ties are settled the same way every time: of two plans with equal score the cheaper is kept,
and of two with equal bits and equal score the one found first (cheaper options first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitplan.solve.problem import Problem, UnitOptions

# Past these sizes the DP's memory (two small arrays per point per unit) stops being cheap;
# the caller then falls back to a MILP per budget.
DEFAULT_MAX_FRONT = 2_000_000
STORED_PER_FRONT = 20  # total stored points allowed, as a multiple of the front limit


class FrontTooLarge(Exception):
    """The front outgrew the limit; raised so the caller can fall back to the MILP."""


@dataclass(frozen=True)
class Front:
    """The exact Pareto front: ``bits`` ascending, ``scores`` strictly descending."""

    bits: np.ndarray  # int64 total bits of each point
    scores: np.ndarray  # float64 total score of each point
    parents: tuple[np.ndarray, ...]  # per unit: index of the point one unit earlier
    options: tuple[np.ndarray, ...]  # per unit: index of the option the unit took

    def index_for(self, budget_bits: int) -> int:
        """The point with the lowest score that fits in ``budget_bits`` (-1 if none fits)."""
        return int(np.searchsorted(self.bits, budget_bits, side="right")) - 1

    def picks(self, indices: np.ndarray) -> np.ndarray:
        """Option index per unit (columns) for each front point in ``indices`` (rows)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), len(self.options)), dtype=np.int64)
        for step in range(len(self.options) - 1, -1, -1):
            out[:, step] = self.options[step][indices]
            indices = self.parents[step][indices]
        return out


def dominance_pruned(unit: UnitOptions) -> np.ndarray:
    """Indices of the unit's options that no other option beats on both cost and score.

    Options come cheapest first (equal costs: best score first), so an option survives exactly
    when its score is strictly below every cheaper one's.
    """
    best = np.minimum.accumulate(unit.scores)
    keep = np.ones(len(unit.scores), dtype=bool)
    keep[1:] = unit.scores[1:] < best[:-1]
    return np.flatnonzero(keep)


def build_front(
    problem: Problem,
    *,
    max_bits: int | None = None,
    max_front: int = DEFAULT_MAX_FRONT,
) -> Front:
    """The exact Pareto front, keeping only plans that cost at most ``max_bits`` (if given).

    Raises FrontTooLarge when a front exceeds ``max_front`` points, or when all fronts together
    exceed ``STORED_PER_FRONT * max_front`` (the back-pointers must stay in memory).
    """
    problem.require_scores()
    kept = [dominance_pruned(u) for u in problem.units]
    # The cheapest the units not yet added can possibly cost: used to drop plans that cannot
    # fit under max_bits however the rest is chosen.
    cheapest_after = np.zeros(len(kept) + 1, dtype=np.int64)
    for i in range(len(kept) - 1, -1, -1):
        cheapest_after[i] = cheapest_after[i + 1] + problem.units[i].costs[kept[i][0]]

    bits = np.zeros(1, dtype=np.int64)
    scores = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    stored = 0
    for i, (unit, allowed) in enumerate(zip(problem.units, kept, strict=True)):
        limit = None if max_bits is None else max_bits - cheapest_after[i + 1]
        bits, scores, parent, option = _add_unit(
            bits, scores, unit.costs[allowed], unit.scores[allowed], limit
        )
        if len(bits) == 0:
            raise ValueError("no plan fits under max_bits; check the budget first")
        stored += len(bits)
        if len(bits) > max_front or stored > STORED_PER_FRONT * max_front:
            raise FrontTooLarge(f"front reached {len(bits)} points after {i + 1} units")
        parents.append(parent)
        options.append(allowed[option])  # back to the unit's own option numbering
    return Front(bits, scores, tuple(parents), tuple(options))


def _add_unit(
    bits: np.ndarray,
    scores: np.ndarray,
    costs: np.ndarray,
    unit_scores: np.ndarray,
    limit: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Offer every front point with every option; return the non-dominated offers.

    Returns the new bits and scores, and for each new point its parent and option index.
    """
    n = len(bits)
    # Row k holds the front shifted by option k; each row is sorted by bits already.
    offer_bits = (bits[None, :] + costs[:, None]).ravel()
    offer_scores = (scores[None, :] + unit_scores[:, None]).ravel()
    offer_ids = np.arange(len(offer_bits), dtype=np.int64)
    if limit is not None:
        fits = offer_bits <= limit
        offer_bits, offer_scores, offer_ids = offer_bits[fits], offer_scores[fits], offer_ids[fits]
    if len(costs) > 1:
        # A stable sort of a few sorted runs is a merge; equal bits stay in option order.
        order = np.argsort(offer_bits, kind="stable")
        offer_bits, offer_scores, offer_ids = (
            offer_bits[order],
            offer_scores[order],
            offer_ids[order],
        )
        keep = _pareto_mask(offer_bits, offer_scores)
        offer_bits, offer_scores, offer_ids = offer_bits[keep], offer_scores[keep], offer_ids[keep]
    # A single option shifts the front without reordering it, so nothing becomes dominated.
    option, parent = np.divmod(offer_ids, n)
    index_type = np.int32 if n < 2**31 else np.int64  # halves the back-pointers' memory
    return offer_bits, offer_scores, parent.astype(index_type), option.astype(np.int16)


def _pareto_mask(bits: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mask of the non-dominated points among points sorted by bits (ties in a fixed order).

    Within a run of equal bits only the first lowest score can survive; it survives when it is
    strictly below the best score of every cheaper run.
    """
    keep = np.zeros(len(bits), dtype=bool)
    if len(bits) == 0:
        return keep
    starts = np.flatnonzero(np.r_[True, bits[1:] != bits[:-1]])
    run_best = np.minimum.reduceat(scores, starts)
    sizes = np.diff(np.r_[starts, len(bits)])
    run_of = np.repeat(np.arange(len(starts)), sizes)
    at_best = np.flatnonzero(scores == run_best[run_of])
    first = at_best[np.r_[True, run_of[at_best][1:] != run_of[at_best][:-1]]]  # one per run
    better = np.ones(len(starts), dtype=bool)
    better[1:] = run_best[1:] < np.minimum.accumulate(run_best)[:-1]
    keep[first[better]] = True
    return keep
