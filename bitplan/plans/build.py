"""From a model's layer table, formats and scores to Plans: the glue between ``score`` and
``solve`` (which knows nothing about models)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from bitplan.accounting import average_bits
from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format
from bitplan.model.layers import LayerTable
from bitplan.plans.plan import Plan
from bitplan.score.scores import Scores
from bitplan.solve import Solution, Unit, head, solve, tail, uniform

RECIPES = ("uniform", "head", "tail")


def build_units(
    table: LayerTable,
    formats: Sequence[Format],
    scores: Scores | None,
    include_head: bool,
    include_scales: bool,
) -> list[Unit]:
    """One solver unit per fusion group: exact bits and summed scores for every option."""
    group_scores = scores.group_scores(table, include_head) if scores is not None else {}
    units = []
    for group, layers in table.groups(include_head).items():
        units.append(
            Unit(
                name=group,
                block=layers[0].block,
                weights=sum(layer.params for layer in layers),
                costs={
                    fmt.name: sum(fmt.weight_bits(layer.shape, include_scales) for layer in layers)
                    for fmt in formats
                },
                scores=dict(group_scores.get(group, {})),
            )
        )
    return units


def resolve_pins(
    pin_specs: Sequence[str], table: LayerTable, formats: Sequence[Format]
) -> tuple[dict[str, str], bool]:
    """Turn ``REGEX=FORMAT`` strings into fusion group -> option pins.

    A regex is searched in every layer name (``lm_head``, ``layers\\.0\\.``, ``down_proj``). It
    must cover whole fusion groups. Returns the pins and whether one of them names lm_head (which
    then joins the plan and the budget).
    """
    names = {fmt.name for fmt in formats}
    pins: dict[str, str] = {}
    pins_head = False
    all_layers = list(table)
    for spec in pin_specs:
        pattern, sep, option = spec.rpartition("=")
        if not sep or not pattern:
            raise BitplanError(
                f"pin {spec!r} is not of the form REGEX=FORMAT, e.g. 'lm_head=mxfp8'"
            )
        option = parse_format(option).name
        if option not in names:
            raise BitplanError(
                f"pin {spec!r}: {option} is not one of the options ({', '.join(sorted(names))})"
            )
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise BitplanError(f"pin {spec!r}: bad regular expression: {err}") from err
        matched = [layer for layer in all_layers if regex.search(layer.name)]
        if not matched:
            raise BitplanError(f"pin {spec!r} matches no layer (try `bitplan info --layers`)")
        for layer in matched:
            members = [other.name for other in all_layers if other.group == layer.group]
            left_out = [name for name in members if not regex.search(name)]
            if left_out:
                raise BitplanError(
                    f"pin {spec!r} covers {layer.name} but not {', '.join(left_out)}, which an "
                    "engine fuses with it: pin the whole group"
                )
            pins[layer.group] = option
            pins_head = pins_head or layer.role == "lm_head"
    return pins, pins_head


def _plan_from_solution(
    solution: Solution,
    table: LayerTable,
    formats: Sequence[Format],
    model_id: str,
    recipe: str,
    include_head: bool,
    include_scales: bool,
    scorer: str | None,
) -> Plan:
    by_name = {fmt.name: fmt for fmt in formats}
    layer_formats = {}
    for group, layers in table.groups(include_head).items():
        for layer in layers:
            layer_formats[layer.name] = solution.choice[group]
    layers = table.selected(include_head)
    fmt_of = {name: by_name[opt] for name, opt in layer_formats.items()}
    score = solution.score if solution.score == solution.score else None  # nan -> None
    return Plan(
        model=model_id,
        recipe=recipe,
        options=[fmt.name for fmt in formats],
        layer_formats=layer_formats,
        budget_avg_bits=solution.budget_avg_bits,
        avg_bits=solution.avg_bits,
        avg_bits_with_scales=average_bits(layers, fmt_of, include_scales=True),
        avg_bits_without_scales=average_bits(layers, fmt_of, include_scales=False),
        include_scales=include_scales,
        include_head=include_head,
        predicted_loss=score,
        scorer=scorer,
        proven_optimal=solution.proven_optimal,
        group_formats=dict(solution.choice),
    )


def solve_plans(
    table: LayerTable,
    formats: Sequence[Format],
    scores: Scores,
    budgets: Sequence[float],
    model_id: str,
    include_head: bool = False,
    include_scales: bool = True,
    pins: dict[str, str] | None = None,
) -> list[Plan]:
    """The least-loss plan for every budget, each a proven optimum of the summed scores."""
    units = build_units(table, formats, scores, include_head, include_scales)
    solutions = solve(units, list(budgets), pins=pins)
    return [
        _plan_from_solution(
            sol, table, formats, model_id, "bitplan", include_head, include_scales, scores.scorer
        )
        for sol in solutions
    ]


def baseline_plan(
    recipe: str,
    table: LayerTable,
    formats: Sequence[Format],
    budget: float | None,
    model_id: str,
    include_head: bool = False,
    include_scales: bool = True,
    pins: dict[str, str] | None = None,
    scores: Scores | None = None,
) -> Plan:
    """A reference recipe: ``uniform`` (all the cheapest option), ``head`` / ``tail`` (whole
    blocks nearest the output / the embedding promoted to the most expensive option while the
    budget allows)."""
    if recipe not in RECIPES:
        raise BitplanError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    units = build_units(table, formats, scores, include_head, include_scales)
    probe = units[0]
    low = min(probe.costs, key=probe.costs.__getitem__)
    high = max(probe.costs, key=probe.costs.__getitem__)
    if recipe == "uniform":
        solution = uniform(units, low, pins=pins)
    else:
        if budget is None:
            raise BitplanError(f"the {recipe} recipe needs a budget (--avg-bits)")
        solution = (head if recipe == "head" else tail)(units, low, high, budget, pins=pins)
    return _plan_from_solution(
        solution, table, formats, model_id, recipe, include_head, include_scales, None
    )
