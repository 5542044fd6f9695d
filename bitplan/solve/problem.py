"""The values the solver works on: choice units in, solutions out, and the checked problem.

A *unit* is one fusion group: layers that must share one format. Each unit offers options
(format names), each with an exact cost in bits and a predicted loss increase ("score").
The budget is an average number of bits per weight over all the units given; it is turned
into an exact integer number of bits once, here, so nothing downstream compares floats.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Real

import numpy as np

from bitplan.errors import BitplanError


@dataclass(frozen=True)
class Unit:
    """One fusion group of layers that must share a format."""

    name: str  # e.g. "model.layers.3.self_attn.qkv"
    block: int | None  # decoder block index (0 = nearest the embedding); None for lm_head etc.
    weights: int  # number of weight elements, for the average
    costs: dict[str, int]  # option -> exact bits
    scores: dict[str, float] = field(default_factory=dict)  # option -> predicted loss increase


@dataclass
class Solution:
    """One option per unit, with what it costs and what it is predicted to lose."""

    choice: dict[str, str]  # unit name -> option
    total_bits: int
    avg_bits: float  # total_bits / total weights
    score: float  # summed predicted loss (nan when a chosen option has no score)
    budget_avg_bits: float
    proven_optimal: bool
    method: str  # "pareto-dp", "milp", or a baseline recipe's name


@dataclass(frozen=True)
class UnitOptions:
    """The options a unit may take once pins are applied, cheapest first."""

    unit: Unit
    names: tuple[str, ...]
    costs: np.ndarray  # int64, ascending
    scores: np.ndarray  # float64, nan where the unit has no score for the option
    pinned: bool


@dataclass(frozen=True)
class Problem:
    """Units checked against each other and against the pins, ready for any solver."""

    units: tuple[UnitOptions, ...]
    total_weights: int
    pinned: bool  # whether any pins were given (only changes error messages)

    @classmethod
    def build(cls, units: Iterable[Unit], pins: Mapping[str, str] | None = None) -> Problem:
        units = list(units)
        if not units:
            raise BitplanError("there are no layers to plan: the list of choice units is empty")
        pins = dict(pins or {})
        seen: set[str] = set()
        for unit in units:
            if unit.name in seen:
                raise BitplanError(f"choice unit {unit.name!r} appears twice")
            seen.add(unit.name)
        unknown = sorted(set(pins) - seen)
        if unknown:
            raise BitplanError(f"pins name units that do not exist: {', '.join(unknown)}")
        prepared = tuple(_unit_options(unit, pins.get(unit.name)) for unit in units)
        total_weights = sum(_positive_int(u.weights, f"weights of {u.name!r}") for u in units)
        problem = cls(prepared, total_weights, pinned=bool(pins))
        if problem.cost_range()[1] >= 2**62:  # the solvers add bits in int64
            raise BitplanError("the options' costs add up to more bits than the solver can count")
        return problem

    def budget_bits(self, avg_bits: float | int | Fraction) -> int:
        """The largest whole number of bits allowed by an average of ``avg_bits`` per weight."""
        return math.floor(_exact_fraction(avg_bits) * self.total_weights)

    def cost_range(self) -> tuple[int, int]:
        """The smallest and largest total bits any choice can reach."""
        low = sum(int(u.costs.min()) for u in self.units)
        high = sum(int(u.costs.max()) for u in self.units)
        return low, high

    def check_reachable(self, avg_bits: float | int | Fraction) -> int:
        """The budget in bits, or a BitplanError saying the reachable range if it is too low. A
        budget above the range is the range's top: every choice fits in either (and a huge one
        would overflow the solver's integer arithmetic)."""
        budget = self.budget_bits(avg_bits)
        low, high = self.cost_range()
        if budget < low:
            lo, hi = low / self.total_weights, high / self.total_weights
            pins = " with the pins given" if self.pinned else ""
            raise BitplanError(
                f"target {avg_bits} bits is below what these options can reach "
                f"({_format_bits(lo, avg_bits)} to {hi:.2f} bits{pins})"
            )
        return min(budget, high)

    def require_scores(self) -> None:
        """Raise unless every allowed option of every unit has a finite score."""
        for u in self.units:
            missing = [n for n, s in zip(u.names, u.scores, strict=True) if math.isnan(s)]
            if missing:
                raise BitplanError(
                    f"unit {u.unit.name!r} has no score for {', '.join(missing)}: "
                    "score every option before solving"
                )

    def solution(
        self,
        picks: list[int],
        budget_avg_bits: float | None,
        proven_optimal: bool,
        method: str,
    ) -> Solution:
        """A Solution from one option index per unit, with bits and score summed exactly.

        ``budget_avg_bits`` None means the plan sets its own budget (what it costs).
        """
        choice = {u.unit.name: u.names[k] for u, k in zip(self.units, picks, strict=True)}
        total = sum(int(u.costs[k]) for u, k in zip(self.units, picks, strict=True))
        # fsum so that every method reports the same score for the same choice.
        score = math.fsum(float(u.scores[k]) for u, k in zip(self.units, picks, strict=True))
        return Solution(
            choice=choice,
            total_bits=total,
            avg_bits=total / self.total_weights,
            score=score,
            budget_avg_bits=total / self.total_weights
            if budget_avg_bits is None
            else float(budget_avg_bits),
            proven_optimal=proven_optimal,
            method=method,
        )


def _unit_options(unit: Unit, pin: str | None) -> UnitOptions:
    if not unit.costs:
        raise BitplanError(f"unit {unit.name!r} has no options")
    if pin is not None and pin not in unit.costs:
        known = ", ".join(sorted(unit.costs))
        raise BitplanError(f"unit {unit.name!r} is pinned to {pin!r}, which it lacks ({known})")
    names = [pin] if pin is not None else list(unit.costs)
    costs = [_nonnegative_int(unit.costs[n], f"cost of {n!r} in {unit.name!r}") for n in names]
    scores = [_score(unit, n) for n in names]
    # Cheapest first, then best score, then name: a fixed order whatever the dict order was.
    order = sorted(range(len(names)), key=lambda i: (costs[i], _nan_last(scores[i]), names[i]))
    return UnitOptions(
        unit=unit,
        names=tuple(names[i] for i in order),
        costs=np.array([costs[i] for i in order], dtype=np.int64),
        scores=np.array([scores[i] for i in order], dtype=np.float64),
        pinned=pin is not None,
    )


def _score(unit: Unit, option: str) -> float:
    if option not in unit.scores:
        return math.nan
    value = float(unit.scores[option])
    if not math.isfinite(value):
        raise BitplanError(
            f"score of {option!r} in {unit.name!r} is {value}; scores must be finite"
        )
    return value


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _nonnegative_int(value: object, what: str) -> int:
    try:
        n = operator.index(value)  # accepts numpy integers, refuses floats
    except TypeError:
        raise BitplanError(f"{what} must be a whole number of bits, got {value!r}") from None
    if n < 0:
        raise BitplanError(f"{what} must not be negative, got {n}")
    return n


def _positive_int(value: object, what: str) -> int:
    n = _nonnegative_int(value, what)
    if n == 0:
        raise BitplanError(f"{what} must be positive")
    return n


def _exact_fraction(x: object) -> Fraction:
    """The number the user wrote: 4.1 means 41/10, not the binary float nearest to it."""
    if isinstance(x, (int, np.integer, Fraction)) and not isinstance(x, bool):
        return Fraction(int(x)) if isinstance(x, np.integer) else Fraction(x)
    if isinstance(x, Real) and math.isfinite(x):  # type: ignore[arg-type]
        return Fraction(str(float(x)))
    raise BitplanError(f"target {x!r} is not a finite number of bits")


def _format_bits(reachable: float, target: object) -> str:
    """Two decimals, or more when two would print the minimum at or below the target."""
    for digits in range(2, 10):
        text = f"{reachable:.{digits}f}"
        if float(text) > float(target):  # type: ignore[arg-type]
            return text
    return repr(reachable)
