"""Building plans: what a plan chooses among (solver units and pins), and the one Plan builder.

Every Plan is made by :func:`build_plan`, whatever chose its formats: the solver
(:meth:`PlanSpace.solve`), a recipe (``recipes.py``) or an explicit table of layer formats
(:func:`plan_from_formats`, plans read back from other tools). ``bitplan.solve`` beneath knows
nothing about models: :class:`PlanSpace` turns a layer table into its units.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bitplan.accounting import average_bits
from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format
from bitplan.formats.gguf import makes_a_gguf_file
from bitplan.model.layers import LayerInfo, LayerTable
from bitplan.plans.plan import Plan
from bitplan.solve import Solution, Unit, pareto_front, reachable_range, solve

if TYPE_CHECKING:  # only for hints: the plans stage does not run models or scorers
    from bitplan.model.loading import LoadedModel
    from bitplan.scoring.scores import Scores


def build_plan(
    model_id: str,
    recipe: str,
    layers: Sequence[LayerInfo],
    layer_formats: Mapping[str, Format],
    options: Sequence[str],
    include_scales: bool,
    include_head: bool = False,
    budget_avg_bits: float | None = None,
    group_formats: Mapping[str, str] | None = None,
    predicted_loss: float | None = None,
    scorer: str | None = None,
    proven_optimal: bool = False,
    serve: str | None = None,
) -> Plan:
    """A Plan from a choice of formats, made the same way for every kind of plan.

    ``layer_formats`` (layer name -> format, in the order the plan file lists them) may name
    layers outside ``layers``; the average bits are counted over ``layers`` alone, with and
    without scale bits, and ``avg_bits`` is the one ``include_scales`` says.
    """
    with_scales = average_bits(layers, layer_formats, include_scales=True)
    without = average_bits(layers, layer_formats, include_scales=False)
    return Plan(
        model=model_id,
        recipe=recipe,
        scorer=scorer,
        options=list(options),
        # the choice
        layer_formats={name: fmt.name for name, fmt in layer_formats.items()},
        group_formats=dict(group_formats or {}),
        include_head=include_head,
        # its bits
        budget_avg_bits=budget_avg_bits,
        avg_bits=with_scales if include_scales else without,
        avg_bits_with_scales=with_scales,
        avg_bits_without_scales=without,
        include_scales=include_scales,
        # what it is predicted to lose
        predicted_loss=predicted_loss,
        proven_optimal=proven_optimal,
        serve=serve,
    )


def planning_table(table: LayerTable, formats: Sequence[Format]) -> LayerTable:
    """What a plan over ``formats`` chooses for: each fusion group (engines fuse q/k/v and
    gate/up into one matmul with one scheme), but for a GGUF file each tensor, an untied token
    embedding included (``LayerTable.as_gguf_tensors``)."""
    return table.as_gguf_tensors() if makes_a_gguf_file(formats) else table


def storable_options(formats: Sequence[Format], layers: Sequence[LayerInfo]) -> list[Format]:
    """The options every one of ``layers`` can be stored in: all, except that a token embedding
    takes no llama.cpp type that llama-quantize makes only with an importance matrix (llama.cpp
    collects none for an embedding, which is looked up, not multiplied)."""
    embeddings = [layer for layer in layers if layer.role == "embedding"]
    return [
        fmt
        for fmt in formats
        if not any(fmt.requires_importance_for(layer.shape[1]) for layer in embeddings)
    ]


@dataclass(frozen=True)
class PlanSpace:
    """What a plan chooses among: one solver unit per fusion group, with the exact bits of every
    option, and the pins. Built once per search (before scoring, so that the budgets can be
    checked early); the scores join the units when there are some."""

    table: LayerTable
    formats: tuple[Format, ...]
    include_head: bool
    include_scales: bool
    pins: dict[str, str]  # fusion group -> option
    units: tuple[Unit, ...]  # costs only, no scores
    serve: str | None = None  # the engine the plans are for (bitplan.serving)

    @classmethod
    def build(
        cls,
        table: LayerTable,
        formats: Sequence[Format],
        include_head: bool = False,
        include_scales: bool = True,
        pins: Mapping[str, str] | None = None,
        serve: str | None = None,
    ) -> PlanSpace:
        """One unit per fusion group; with ``serve``, a group offers only the options that
        engine can run in its layers' shapes."""
        units = tuple(
            Unit(
                name=group,
                block=layers[0].block,
                weights=sum(layer.params for layer in layers),
                costs={
                    fmt.name: sum(fmt.weight_bits(layer.shape, include_scales) for layer in layers)
                    for fmt in _servable(storable_options(formats, layers), group, layers, serve)
                },
            )
            for group, layers in table.groups(include_head).items()
        )
        pins = dict(pins or {})
        return cls(table, tuple(formats), include_head, include_scales, pins, units, serve)

    @classmethod
    def with_pin_specs(
        cls,
        table: LayerTable,
        formats: Sequence[Format],
        pin_specs: Sequence[str] = (),
        include_head: bool = False,
        include_scales: bool = True,
        serve: str | None = None,
    ) -> PlanSpace:
        """The space of a search whose pins are ``REGEX=FORMAT`` strings (``resolve_pins``); a
        pin on lm_head (or a planned token embedding) brings them into the plan."""
        pins, pins_head = resolve_pins(pin_specs, table, formats)
        return cls.build(table, formats, include_head or pins_head, include_scales, pins, serve)

    def reachable_range(self) -> tuple[float, float]:
        """The lowest and highest average bits any plan here can reach."""
        return reachable_range(self.units, self.pins)

    def scored_units(self, scores: Scores | None) -> list[Unit]:
        """The units with each fusion group's summed scores (none when ``scores`` is None)."""
        if scores is None:
            return list(self.units)
        group_scores = scores.group_scores(self.table, self.include_head)
        return [
            dataclasses.replace(unit, scores=dict(group_scores.get(unit.name, {})))
            for unit in self.units
        ]

    def solve(
        self, scores: Scores, budgets: Sequence[float], model_id: str, recipe: str = "bitplan"
    ) -> list[Plan]:
        """The least-loss plan for every budget, each a proven optimum of the summed scores."""
        solutions = solve(self.scored_units(scores), list(budgets), pins=self.pins)
        return [self.plan(sol, model_id, recipe, scores.scorer) for sol in solutions]

    def front(self, scores: Scores) -> list[tuple[float, float]]:
        """Every (average bits, predicted loss) point of the exact Pareto front."""
        return pareto_front(self.scored_units(scores), self.pins)

    def plan(
        self, solution: Solution, model_id: str, recipe: str, scorer: str | None = None
    ) -> Plan:
        """The Plan of a solver's (or a recipe's) choice of one option per fusion group."""
        by_name = {fmt.name: fmt for fmt in self.formats}
        groups = self.table.groups(self.include_head)
        layer_formats = {
            layer.name: by_name[solution.choice[group]]
            for group, layers in groups.items()
            for layer in layers
        }
        return build_plan(
            model_id,
            recipe,
            self.table.selected(self.include_head),
            layer_formats,
            options=[fmt.name for fmt in self.formats],
            include_scales=self.include_scales,
            include_head=self.include_head,
            budget_avg_bits=solution.budget_avg_bits,
            group_formats=solution.choice,
            # a recipe's choice over units without scores sums to nan
            predicted_loss=None if math.isnan(solution.score) else solution.score,
            scorer=scorer,
            proven_optimal=solution.proven_optimal,
            serve=self.serve,
        )


def _servable(
    formats: Sequence[Format], group: str, layers: Sequence[LayerInfo], serve: str | None
) -> list[Format]:
    """The options ``serve`` can run in every layer of a fusion group (all without ``serve``);
    a group left with none is refused, with the reasons."""
    if serve is None:
        return list(formats)
    from bitplan.serving import layer_refusal

    refusals = {
        fmt.name: next(filter(None, (layer_refusal(serve, fmt, x.shape) for x in layers)), None)
        for fmt in formats
    }
    allowed = [fmt for fmt in formats if refusals[fmt.name] is None]
    if not allowed:
        reasons = "; ".join(f"{name}: {why}" for name, why in refusals.items())
        raise BitplanError(f"--serve {serve} can run none of the options in {group}: {reasons}")
    return allowed


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
    space = PlanSpace.build(table, formats, include_head, include_scales, pins)
    return space.solve(scores, budgets, model_id)


def plan_from_formats(
    model: LoadedModel, layer_formats: Mapping[str, str], recipe: str, model_id: str | None = None
) -> Plan:
    """A Plan for the decoder layers of ``model`` with the given layer -> format names (each
    layer its own group, as in a GGUF file), its budget what it costs, scales counted."""
    layers = model.layers.decoder_layers()
    missing = [layer.name for layer in layers if layer.name not in layer_formats]
    if missing:
        raise BitplanError(f"no format for {len(missing)} layer(s), e.g. {missing[0]}")
    formats = {name: parse_format(fmt) for name, fmt in layer_formats.items()}
    return build_plan(
        model_id or model.identity,
        recipe,
        layers,
        {layer.name: formats[layer.name] for layer in layers},
        options=sorted({fmt.name for fmt in formats.values()}),
        include_scales=True,
        group_formats={layer.name: formats[layer.name].name for layer in layers},
    )


def resolve_pins(
    pin_specs: Sequence[str], table: LayerTable, formats: Sequence[Format]
) -> tuple[dict[str, str], bool]:
    """Turn ``REGEX=FORMAT`` strings into fusion group -> option pins.

    A regex is searched in every layer name (``lm_head``, ``layers\\.0\\.``, ``down_proj``). It
    must cover whole fusion groups. Returns the pins and whether one of them names lm_head or a
    planned token embedding (which then join the plan and the budget, ``include_head``).
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
            pins_head = pins_head or layer.block is None  # lm_head, a planned embedding
    return pins, pins_head
