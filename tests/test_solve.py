"""The solver against brute force, its front, its MILP fallback, its errors, and the baselines."""

from __future__ import annotations

import itertools
import math
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bitplan.errors import BitplanError
from bitplan.solve import Unit, pareto_front, promote_blocks, reachable_range, solve, uniform

OPTIONS = ("a", "b", "c")
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- instances and brute force


@st.composite
def instances(draw, dyadic: bool = True):
    """1-7 units of 2-3 options; costs from a small pool so that units often share them.

    With ``dyadic`` scores are quarters, so every sum is exact in float64 and ties are real.
    """
    n = draw(st.integers(1, 7))
    cost_pool = draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))
    if dyadic:
        score = st.integers(0, 40).map(lambda q: q / 4)
    else:
        score = st.floats(0, 1e3, allow_nan=False, allow_infinity=False)
    units = []
    for i in range(n):
        names = draw(st.lists(st.sampled_from(OPTIONS), min_size=2, max_size=3, unique=True))
        units.append(
            Unit(
                name=f"u{i}",
                block=draw(st.none() | st.integers(0, 3)),
                weights=draw(st.integers(1, 10)),
                costs={o: draw(st.sampled_from(cost_pool) | st.integers(0, 40)) for o in names},
                scores={o: draw(score) for o in names},
            )
        )
    pins = {}
    for u in units:
        if draw(st.integers(0, 3)) == 0:
            pins[u.name] = draw(st.sampled_from(sorted(u.costs)))
    return units, pins


def budgets_for(units, pins, draw_fraction):
    """A target average between a little below the reachable range and a little above it."""
    lo, hi = reachable_range(units, pins)
    return round(lo - 0.5 + draw_fraction * (hi - lo + 1.0), 3)


def allowed(unit, pins):
    return [pins[unit.name]] if unit.name in pins else sorted(unit.costs)


def all_plans(units, pins):
    """Every (bits, score, choice) the units can take: the brute force."""
    for combo in itertools.product(*(allowed(u, pins) for u in units)):
        bits = sum(u.costs[o] for u, o in zip(units, combo, strict=True))
        score = sum(u.scores[o] for u, o in zip(units, combo, strict=True))
        yield bits, score, dict(zip((u.name for u in units), combo, strict=True))


def budget_bits(units, target) -> int:
    return math.floor(Fraction(str(target)) * sum(u.weights for u in units))


def brute_optimum(units, pins, target):
    """(least score, least bits among plans with that score) within the budget, or None."""
    budget = budget_bits(units, target)
    feasible = [(s, b) for b, s, _ in all_plans(units, pins) if b <= budget]
    return min(feasible) if feasible else None


def brute_front(units, pins):
    best: dict[int, float] = {}
    for b, s, _ in all_plans(units, pins):
        best[b] = min(s, best.get(b, math.inf))
    front, floor = [], math.inf
    for b in sorted(best):
        if best[b] < floor:
            front.append((b, best[b]))
            floor = best[b]
    return front


def plan_bits(units, choice):
    return sum(u.costs[choice[u.name]] for u in units)


# ---------------------------------------------------------------- exactness


@FAST
@given(instances(), st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_solver_equals_brute_force(instance, fractions):
    units, pins = instance
    targets = [budgets_for(units, pins, f) for f in fractions]
    cheapest = min(b for b, _, _ in all_plans(units, pins))
    reachable = [t for t in targets if budget_bits(units, t) >= cheapest]
    for target in set(targets) - set(reachable):
        with pytest.raises(BitplanError, match="below what these options can reach"):
            solve(units, target, pins)
    solutions = solve(units, reachable, pins)
    assert len(solutions) == len(reachable)
    for target, sol in zip(reachable, solutions, strict=True):
        best_score, best_bits = brute_optimum(units, pins, target)
        assert sol.proven_optimal and sol.method == "pareto-dp"
        assert sol.total_bits <= budget_bits(units, target)
        assert sol.total_bits == plan_bits(units, sol.choice)
        assert all(sol.choice[n] == o for n, o in pins.items())
        assert sol.score == best_score  # dyadic scores: exact
        assert sol.total_bits == best_bits  # ties go to the cheaper plan


@FAST
@given(instances(dyadic=False), st.floats(0, 1))
def test_solver_equals_brute_force_with_arbitrary_scores(instance, fraction):
    units, pins = instance
    target = budgets_for(units, pins, fraction)
    expected = brute_optimum(units, pins, target)
    if expected is None:
        with pytest.raises(BitplanError):
            solve(units, target, pins)
        return
    sol = solve(units, target, pins)
    assert sol.total_bits <= budget_bits(units, target)
    assert sol.score == pytest.approx(expected[0], rel=1e-12, abs=1e-9)


@FAST
@given(instances())
def test_pareto_front_is_the_brute_force_front(instance):
    units, pins = instance
    weights = sum(u.weights for u in units)
    front = pareto_front(units, pins)
    expected = [(b / weights, s) for b, s in brute_front(units, pins)]
    assert front == expected
    # Non-dominated and monotone: bits rise, scores fall, strictly.
    assert all(b1 < b2 and s1 > s2 for (b1, s1), (b2, s2) in itertools.pairwise(front))
    # Every plan is matched or beaten by a front point that costs no more.
    for b, s, _ in all_plans(units, pins):
        assert any(fb <= b / weights and fs <= s for fb, fs in front)


@settings(max_examples=60, deadline=None)
@given(instances(dyadic=False), st.floats(0, 1))
@example(  # a subnormal largest score once overflowed the MILP's objective scaling (CI)
    (
        [
            Unit("u0", None, 1, {"a": 0, "b": 1, "c": 1}, {"a": 5e-324, "b": 0.0, "c": 0.0}),
            Unit("u1", None, 1, {"a": 1, "b": 1}, {"a": 0.0, "b": 0.0}),
        ],
        {"u1": "a"},
    ),
    1.0,
)
def test_milp_fallback_agrees_with_dp(instance, fraction):
    units, pins = instance
    target = budgets_for(units, pins, fraction)
    if brute_optimum(units, pins, target) is None:
        return
    dp = solve(units, target, pins)
    milp = solve(units, target, pins, max_front=1)  # any real choice overflows a 1-point front
    assert milp.total_bits <= budget_bits(units, target)
    assert milp.proven_optimal
    assert milp.score == pytest.approx(dp.score, rel=1e-9, abs=1e-6)
    weights = sum(u.weights for u in units)
    within = [b for b, _ in pareto_front(units, pins) if b * weights <= budget_bits(units, target)]
    if len(within) > 1:  # the DP must have outgrown its 1-point limit
        assert milp.method == "milp"


def test_budget_is_compared_exactly():
    # 4.35 * 100 is 434.99999999999994 in floats; the exact budget is 435 bits.
    units = [
        Unit("x", 0, 50, {"lo": 200, "hi": 235}, {"lo": 1.0, "hi": 0.0}),
        Unit("y", 1, 50, {"lo": 200, "hi": 300}, {"lo": 1.0, "hi": 0.0}),
    ]
    assert solve(units, 4.35).total_bits == 435
    assert solve(units, Fraction(87, 20)).total_bits == 435
    assert solve(units, 4.34).total_bits == 400


def test_budget_above_the_range_gets_the_least_score_plan():
    units = [
        Unit("x", 0, 10, {"4": 40, "8": 80, "16": 160}, {"4": 2.0, "8": 0.5, "16": 0.5}),
        Unit("y", 1, 10, {"4": 40, "8": 80, "16": 160}, {"4": 1.0, "8": 0.0, "16": 0.1}),
    ]
    sol = solve(units, 100)
    assert sol.choice == {"x": "8", "y": "8"}  # "16" is never better, so never paid for
    assert sol.score == 0.5 and sol.avg_bits == 8.0


def test_single_and_list_budgets():
    units = [Unit(f"u{i}", i, 1, {"a": 4, "b": 8}, {"a": 1.0, "b": 0.0}) for i in range(3)]
    assert solve(units, 6).score == 2.0
    assert [s.score for s in solve(units, [4, 8, 5.5])] == [3.0, 0.0, 2.0]
    assert solve(units, []) == []


# ---------------------------------------------------------------- errors


def _two_units():
    return [
        Unit("a", 0, 100, {"mxfp4": 400, "mxfp8": 800}, {"mxfp4": 1.0, "mxfp8": 0.0}),
        Unit("b", 1, 100, {"mxfp4": 400, "mxfp8": 800}, {"mxfp4": 1.0, "mxfp8": 0.0}),
    ]


def test_budget_below_range_names_the_range():
    with pytest.raises(BitplanError, match=r"target 3\.5 bits .* \(4\.00 to 8\.00 bits\)"):
        solve(_two_units(), 3.5)
    with pytest.raises(BitplanError, match=r"\(6\.00 to 8\.00 bits with the pins given\)"):
        solve(_two_units(), 5, pins={"a": "mxfp8"})
    with pytest.raises(BitplanError, match=r"\(4\.005 to"):  # two decimals would read 4.00
        solve(_two_units()[:1] + [Unit("c", 2, 100, {"x": 401}, {"x": 0.0})], 4.002)


def test_reachable_range():
    assert reachable_range(_two_units()) == (4.0, 8.0)
    assert reachable_range(_two_units(), pins={"b": "mxfp8"}) == (6.0, 8.0)


@pytest.mark.parametrize(
    ("units", "pins", "message"),
    [
        (_two_units(), {"a": "int3"}, "pinned to 'int3', which it lacks"),
        (_two_units(), {"zz": "mxfp4"}, "do not exist: zz"),
        (_two_units() + _two_units()[:1], None, "appears twice"),
        ([], None, "empty"),
        ([Unit("a", 0, 1, {"x": 4}, {})], None, "no score for x"),
        ([Unit("a", 0, 1, {"x": 4.5}, {"x": 0.0})], None, "whole number"),
        ([Unit("a", 0, 1, {"x": -4}, {"x": 0.0})], None, "negative"),
        ([Unit("a", 0, 0, {"x": 4}, {"x": 0.0})], None, "positive"),
        ([Unit("a", 0, 1, {"x": 4}, {"x": math.nan})], None, "finite"),
    ],
)
def test_bad_input_raises(units, pins, message):
    with pytest.raises(BitplanError, match=message):
        solve(units, 8, pins)


@pytest.mark.parametrize("target", [math.nan, math.inf, -1, 0, "5"])
def test_bad_target_raises(target):
    with pytest.raises(BitplanError):
        solve(_two_units(), target)


# ---------------------------------------------------------------- baselines


def _blocks(sizes, with_head=True):
    """One unit per block, block i holding ``sizes[i]`` weights; plus an lm_head outside blocks."""
    units = [
        Unit(f"b{i}", i, w, {"lo": 4 * w, "hi": 8 * w}, {"lo": 1.0, "hi": 0.0})
        for i, w in enumerate(sizes)
    ]
    if with_head:
        units.append(Unit("lm_head", None, 10, {"lo": 40, "hi": 80}, {"lo": 1.0, "hi": 0.0}))
    return units


def _promoted(sol):
    return sorted(n for n, o in sol.choice.items() if o == "hi")


def test_promotion_from_the_output_stops_at_the_first_misfit():
    units = _blocks([10, 10, 10, 10])  # 50 weights; all low = 200 bits
    # Budget 290 bits: two blocks (+40 each) fit, a third would not.
    assert _promoted(promote_blocks(units, "lo", "hi", 5.8, from_output=True)) == ["b2", "b3"]
    assert _promoted(promote_blocks(units, "lo", "hi", 5.8, from_output=False)) == ["b0", "b1"]
    # A big block next in line stops promotion even though a later small one would fit.
    units = _blocks([10, 10, 100, 10])  # 140 weights; all low = 560 bits
    assert _promoted(promote_blocks(units, "lo", "hi", 4.6, from_output=True)) == ["b3"]
    assert _promoted(promote_blocks(units, "lo", "hi", 4.6, from_output=False)) == ["b0", "b1"]
    # The lm_head (block None) stays low even when everything else is promoted.
    everything = promote_blocks(units, "lo", "hi", 100, from_output=False)
    assert _promoted(everything) == ["b0", "b1", "b2", "b3"]


def test_baselines_promote_whole_blocks_and_respect_pins():
    units = [
        Unit(f"blk{b}.{k}", b, 10, {"lo": 40, "hi": 80}, {"lo": 1.0, "hi": 0.0})
        for b in range(3)
        for k in range(2)
    ]
    sol = promote_blocks(
        units, "lo", "hi", 6.7, pins={"blk2.0": "lo", "blk0.0": "hi"}, from_output=True
    )
    # 402 bits: all low but pinned blk0.0 is 280; block 2 (only blk2.1 free) adds 40,
    # block 1 adds 80, and block 0's free unit would add 40 more than fits.
    assert sol.choice == {
        "blk0.0": "hi",
        "blk0.1": "lo",
        "blk1.0": "hi",
        "blk1.1": "hi",
        "blk2.0": "lo",
        "blk2.1": "hi",
    }
    assert sol.total_bits == 400 and sol.method == "head"
    assert not sol.proven_optimal
    flat = uniform(units, "lo", pins={"blk1.1": "hi"})
    assert flat.total_bits == 6 * 40 + 40 and flat.budget_avg_bits == flat.avg_bits
    with pytest.raises(BitplanError, match="below what 'lo' everywhere costs"):
        promote_blocks(units, "lo", "hi", 3.9, from_output=False)
    with pytest.raises(BitplanError, match="no option 'q8'"):
        promote_blocks(units, "lo", "q8", 6, from_output=True)


@FAST
@given(instances(), st.floats(0, 1), st.booleans())
def test_baselines_never_exceed_the_budget(instance, fraction, from_output):
    units, pins = instance
    # Give every unit the two recipe options so the recipes apply.
    units = [
        Unit(u.name, u.block, u.weights, {"lo": min(u.costs.values()), "hi": max(u.costs.values())})
        for u in units
    ]
    pins = {n: "hi" for n in pins}
    target = budgets_for(units, pins, fraction)
    low_bits = plan_bits(units, {u.name: pins.get(u.name, "lo") for u in units})
    if low_bits > budget_bits(units, target):
        with pytest.raises(BitplanError):
            promote_blocks(units, "lo", "hi", target, pins, from_output=from_output)
        return
    sol = promote_blocks(units, "lo", "hi", target, pins, from_output=from_output)
    assert sol.total_bits <= budget_bits(units, target)
    assert all(sol.choice[n] == "hi" for n in pins)
    assert math.isnan(sol.score)  # these units carry no scores
    # Promoted blocks form a run from the chosen end (pinned units say nothing).
    free = [u for u in units if u.name not in pins]
    blocks = sorted({u.block for u in free if u.block is not None}, reverse=from_output)
    done = [all(sol.choice[u.name] == "hi" for u in free if u.block == b) for b in blocks]
    assert all(sol.choice[u.name] == "lo" for u in free if u.block is None)
    assert done == sorted(done, reverse=True)


# ---------------------------------------------------------------- a realistic size


def realistic_units(seed: int = 0) -> list[Unit]:
    """30 blocks x 7 Linear layers of Llama-3.1-8B shapes, 4 MX-like options with scale bits."""
    rng = np.random.default_rng(seed)
    hidden, kv, inter = 4096, 1024, 14336
    shapes = {
        "q": hidden * hidden,
        "k": hidden * kv,
        "v": hidden * kv,
        "o": hidden * hidden,
        "gate": hidden * inter,
        "up": hidden * inter,
        "down": inter * hidden,
    }
    quarter_bits = {"mxfp4": 17, "mxfp6": 25, "mxfp8": 33, "bf16": 64}
    units = []
    for block in range(30):
        for role, weights in shapes.items():
            losses = np.sort(rng.random(4) * weights / 1e6)[::-1]  # more bits, less loss
            units.append(
                Unit(
                    name=f"model.layers.{block}.{role}",
                    block=block,
                    weights=weights,
                    costs={o: weights * q // 4 for o, q in quarter_bits.items()},
                    scores=dict(zip(quarter_bits, map(float, losses), strict=True)),
                )
            )
    return units


def test_realistic_instance_is_fast():
    units = realistic_units()
    start = time.perf_counter()
    plans = solve(units, [4.5, 5, 6, 8])
    front = pareto_front(units)
    elapsed = time.perf_counter() - start
    assert elapsed < 5
    for plan in plans:
        assert plan.proven_optimal and plan.total_bits <= budget_bits(units, plan.budget_avg_bits)
    assert [p.score for p in plans] == sorted((p.score for p in plans), reverse=True)
    # Each plan is the front's last point within its budget.
    for plan in plans:
        on_front = [s for b, s in front if b <= plan.budget_avg_bits]
        assert plan.score == pytest.approx(on_front[-1], rel=1e-12)
    # The exact optimum beats both recipes at the same budget.
    for target in (4.5, 5, 6):
        best = solve(units, target).score
        assert best <= promote_blocks(units, "mxfp4", "mxfp8", target, from_output=True).score
        assert best <= promote_blocks(units, "mxfp4", "mxfp8", target, from_output=False).score


def test_milp_agrees_with_dp_on_a_larger_random_instance():
    rng = np.random.default_rng(7)
    units = []
    for i in range(60):
        costs = np.sort(rng.integers(10**5, 10**8, 3))
        losses = np.sort(rng.random(3))[::-1]  # dearer options lose less, so none is dominated
        names = ("w4", "w6", "w8")
        units.append(
            Unit(
                f"u{i}",
                i // 3,
                10**7,
                dict(zip(names, map(int, costs), strict=True)),
                dict(zip(names, losses, strict=True)),
            )
        )
    targets = [3.0, 5.0, 7.5]
    exact = solve(units, targets, pins={"u0": "w8"})
    fallback = solve(units, targets, pins={"u0": "w8"}, max_front=10)
    for dp, milp in zip(exact, fallback, strict=True):
        assert milp.method == "milp" and milp.proven_optimal
        assert milp.total_bits <= budget_bits(units, milp.budget_avg_bits)
        assert milp.score == pytest.approx(dp.score, rel=1e-9)
    with pytest.raises(BitplanError, match="too large to list"):
        pareto_front(units, max_front=10)
