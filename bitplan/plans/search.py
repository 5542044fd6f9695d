"""A whole search, as ``bitplan search`` runs it: calibration tokens, scores, plans, Pareto front.

    config = SearchConfig("mxfp4,mxfp8", budgets=[4.5, 5, 6])
    result = run_search(model, config)        # scores once, then one proven-optimal plan a budget
    write_search_outputs(result, "plans/")    # plan_*.json, front.json, scores.json, a PNG

With ``recipe`` set, a baseline plan is built instead and nothing is scored. Everything that can
be checked without scores (options, pins, budgets within reach) is checked before the scoring
pass, which is the long part. ``bitplan.search`` is the same call with keyword arguments.

(This module lives in ``plans/`` but is not imported by ``bitplan.plans`` itself: it drives the
scorers, which the rest of the plans stage does not need.)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitplan.compute import ComputeDtype, choose_dtype
from bitplan.data.calibration import calibration_samples
from bitplan.data.text import check_text_source
from bitplan.distributed import is_main
from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format_list
from bitplan.formats.gguf import check_importance_given, makes_a_gguf_file
from bitplan.jsonio import write_json_atomic
from bitplan.model.layers import LayerTable
from bitplan.model.loading import LoadedModel
from bitplan.model.streaming import BlockLoader
from bitplan.plans.build import PlanSpace, planning_table
from bitplan.plans.plan import ROUNDINGS, Plan, scored_rounding
from bitplan.plans.recipes import (
    RECIPES,
    check_mix,
    llama_cpp_mix_plan,
    recipe_plan,
)
from bitplan.quantization.sequential import check_rounding_formats
from bitplan.scoring import DEFAULT_SCORER, Scores, score
from bitplan.scoring.importance import collect_importance
from bitplan.serving import check_model, check_options, option_notes


@dataclass
class SearchConfig:
    """What to search: the candidate formats, the budgets, and how to score."""

    options: str | Sequence[str | Format]  # "mxfp4,mxfp8", or a list of formats
    budgets: Sequence[float] = ()  # target average bits per weight
    recipe: str | None = None  # a baseline recipe (RECIPES) instead of the solver
    pins: Sequence[str] = ()  # "REGEX=FORMAT": layers forced to a format (resolve_pins)
    include_head: bool = False  # lm_head in scoring and budget (a pin on lm_head implies it)
    include_scales: bool = True  # count scale/zero-point bits in the budget
    scorer: str = DEFAULT_SCORER  # bitplan.scoring.SCORERS
    calib: str | None = None  # calibration text (default: the shipped text)
    n_samples: int = 16
    seq_len: int = 256
    batch_size: int = 4
    cache: bool = True  # reuse cached scores
    device: str = "cpu"  # where blocks are computed
    dtype: str | ComputeDtype = "auto"  # what the passes compute in (bitplan.compute)
    rounding: str = "rtn"  # ROUNDINGS: what the scores assume, recorded in the plans
    serve: str | None = None  # an engine the plans must run on (bitplan.serving.SERVE_TARGETS)
    target_size: int | None = None  # bytes of the whole .gguf file, instead of budgets
    imatrix: bool = False  # llama.cpp types scored (and exported) with an importance matrix
    #: A llama.cpp mix (``Q4_K_M`` ...) to match instead of budgets: its size is the budget,
    #: and the mix itself is kept where it measures better (``bitplan.plans.measured``).
    like: str | None = None
    formats: list[Format] = field(init=False)

    def __post_init__(self) -> None:
        names = self.options if isinstance(self.options, str) else [str(o) for o in self.options]
        self.formats = parse_format_list(names, imatrix=self.imatrix)
        if len(self.formats) < 2 and self.recipe is None:
            raise BitplanError("give at least two --options to choose between, e.g. mxfp4,mxfp8")
        for bits in self.budgets:  # NaN passes every comparison: check it by name
            if not isinstance(bits, (int, float)) or not math.isfinite(bits) or bits <= 0:
                raise BitplanError(
                    f"target {bits!r} is not a number of bits per weight; give positive "
                    "finite numbers, e.g. --avg-bits 4.5 5 6"
                )
        if self.recipe is not None and self.recipe not in RECIPES:
            raise BitplanError(
                f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}"
            )
        if self.recipe == "uniform" and self.budgets:
            raise BitplanError(
                "--recipe uniform puts every layer in the cheapest option and takes no "
                "--avg-bits; drop --avg-bits, or use --recipe head or tail for a budget"
            )
        if self.recipe not in (None, "uniform") and not self.budgets:
            raise BitplanError(f"--recipe {self.recipe} needs --avg-bits")
        if self.calib is not None:
            check_text_source(self.calib)
        if self.rounding not in ROUNDINGS:
            raise BitplanError(
                f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}"
            )
        check_rounding_formats(self.rounding, self.formats)
        check_options(self.serve, self.formats)
        if self.target_size is not None:
            self._check_target_size()
        if self.like is not None:
            self._check_like()
        if self.imatrix and not makes_a_gguf_file(self.formats):
            raise BitplanError("--imatrix is llama.cpp's: give llama.cpp types as options")
        check_importance_given(self.formats, self.imatrix)

    def _check_target_size(self) -> None:
        if self.budgets or self.recipe is not None:
            raise BitplanError("give a target size or --avg-bits budgets, not both")
        if not isinstance(self.target_size, int) or self.target_size <= 0:
            raise BitplanError(f"target size {self.target_size!r} is not a positive byte count")
        if not makes_a_gguf_file(self.formats):
            raise BitplanError(
                "--target-size is the size of a .gguf file: give llama.cpp types as options "
                "(e.g. gguf-all, or q4_k,q6_k)"
            )
        if not self.include_scales:
            raise BitplanError("--target-size counts every stored byte: drop --ignore-scale-bits")

    def _check_like(self) -> None:
        if self.budgets or self.recipe is not None or self.target_size is not None:
            raise BitplanError("--like MIX is the budget: drop --avg-bits, --target-size, --recipe")
        check_mix(self.like, self.imatrix)
        if not makes_a_gguf_file(self.formats):
            raise BitplanError(
                "--like matches a llama.cpp mix: give llama.cpp types as options (e.g. gguf-all)"
            )
        if self.include_head or self.pins or not self.include_scales:
            raise BitplanError(
                "--like plans the decoder layers at the mix's size, scales counted: drop "
                "--quantize-head, --pin and --ignore-scale-bits"
            )

    @property
    def options_label(self) -> str:
        """The options as the user wrote them, for messages."""
        if isinstance(self.options, str):
            return self.options
        return ",".join(fmt.name for fmt in self.formats)


@dataclass
class SearchResult:
    """Plans (one per budget, or the recipe's), with the scores and exact Pareto front they came
    from (None and empty for a recipe)."""

    plans: list[Plan]
    scores: Scores | None
    front: list[tuple[float, float]]  # (average bits, predicted loss), cheapest first
    table: LayerTable  # the model's layers, for the plot
    paths: list[Path] = field(default_factory=list)  # the plan files, once written
    importance: dict | None = None  # layer -> imatrix, when scored with one (for the export)

    @property
    def proven_optimal(self) -> bool:
        return all(plan.proven_optimal for plan in self.plans)


def run_search(
    model: LoadedModel,
    config: SearchConfig,
    loader: BlockLoader | None = None,
    log: Callable[[str], object] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Score ``model`` and solve every budget of ``config`` (or build its recipe's plans).

    ``loader`` (default: a streamed model's own, ``load_streaming``) keeps one block's weights
    in memory at a time while scoring; ``log`` receives the lines worth showing while it runs (the compute dtype, the
    scoring time), ``print`` for the command line."""
    formats = config.formats
    check_model(config.serve, getattr(model.module.config, "model_type", None))
    table = planning_table(model.layers, formats)
    space = PlanSpace.with_pin_specs(
        table, formats, config.pins, config.include_head, config.include_scales, config.serve
    )
    if log is not None and config.serve is not None:
        for note in option_notes(config.serve, formats):
            log(f"note: {note}")
    _check_budgets(space, config, log)
    budgets = list(config.budgets)

    if config.recipe is not None:
        plans = [
            recipe_plan(space, config.recipe, budget, model.identity)
            for budget in (budgets or [None])
        ]
        return SearchResult(_rounded(plans, config.rounding), None, [], table)

    if not budgets and config.target_size is None and config.like is None:
        raise BitplanError("give one or more target budgets with --avg-bits, e.g. 4.5 5 6")
    tokens = calibration_samples(
        model.tokenizer, n_samples=config.n_samples, seq_len=config.seq_len, source=config.calib
    )
    importance = None
    if config.imatrix:  # on the calibration tokens, as llama-imatrix would collect it
        importance = collect_importance(model, tokens, include_head=space.include_head)
    compute = config.dtype
    if not isinstance(compute, ComputeDtype):
        compute = choose_dtype(config.device, compute)
        if log is not None and is_main():
            log(compute.describe())
    scores = score(
        model,
        formats,
        tokens,
        scorer=config.scorer,
        include_head=space.include_head,
        batch_size=config.batch_size,
        cache=config.cache,
        progress=progress,
        loader=loader,
        device=config.device,
        dtype=compute,
        rounding=scored_rounding(config.rounding),
        importance=importance,
    )
    if log is not None:
        hit = " (from cache)" if scores.extra.get("cache_hit") else ""
        log(
            f"scored {len(scores.layer_scores)} layers x {len(formats)} options with "
            f"{scores.scorer} in {scores.seconds:.1f} s{hit}"
        )
    if config.target_size is not None:
        budgets = [budget_for_file_size(space, scores, model, config.target_size, log)]
    if config.like is not None:
        mix = llama_cpp_mix_plan(model, config.like, model.identity, imatrix=config.imatrix)
        budgets = [mix.avg_bits]
    plans = _rounded(space.solve(scores, budgets, model.identity), config.rounding)
    if config.like is not None:
        plans = [_measured_choice(model, plans[0], mix, config, importance, log)]
    return SearchResult(plans, scores, space.front(scores), table, importance=importance)


def _measured_choice(
    model: LoadedModel,
    solved: Plan,
    mix: Plan,
    config: SearchConfig,
    importance: Any,
    log: Callable[[str], object] | None,
) -> Plan:
    """The solved plan or the mix it matches, whichever file diverges less from the model on
    calibration windows the scores did not use (``bitplan.plans.measured``)."""
    from bitplan.plans.measured import check_tokens, least_divergent

    tokens = check_tokens(model, config.n_samples, config.seq_len, config.calib)
    best, kls = least_divergent(model, [solved, mix], tokens, importance=importance)
    kept = [solved, mix][best]
    kept.budget_avg_bits = mix.avg_bits
    if log is not None:
        which = "bitplan's plan" if best == 0 else "the mix"
        log(
            f"{config.like}: KL of bitplan's plan {kls[0]:.5f}, of llama.cpp's mix {kls[1]:.5f} "
            f"(nats/token on {tokens.shape[0]} x {tokens.shape[1]} calibration tokens the scores "
            f"did not use): kept {which}"
        )
    return kept


def budget_for_file_size(
    space: PlanSpace,
    scores: Scores,
    model: LoadedModel,
    target: int,
    log: Callable[[str], object] | None = None,
) -> float:
    """The largest budget (average bits) whose plan makes a .gguf file of at most ``target``
    bytes, everything counted (the export's default embedding and output types). A file is its
    planned layers' bytes plus a part the choice barely moves (metadata, embedding, norms,
    padding): measured on the cheapest plan, then corrected by the solved plan's measured file
    until it fits."""
    from bitplan.exporters.gguf import gguf_file_bytes, gguf_size

    weights = sum(unit.weights for unit in space.units)
    low, high = space.reachable_range()
    (cheapest,) = space.solve(scores, [low + 1e-9], model.identity)  # low, safe from rounding
    smallest = gguf_file_bytes(model, cheapest)
    if smallest > target:
        raise BitplanError(
            f"target size {target:,} bytes is below the smallest file these options make "
            f"({smallest:,} bytes)"
        )
    fixed = smallest - gguf_size(model, cheapest).quantized_bytes
    budget = min((target - fixed) * 8 / weights, high)
    for _ in range(8):
        (plan,) = space.solve(scores, [budget], model.identity)
        size = gguf_file_bytes(model, plan)
        if size <= target:
            if log is not None:
                log(f"target size {target:,} bytes: budget {budget:.6f} bits, file {size:,} bytes")
            return budget
        budget -= max(size - target, 1) * 8 / weights
    raise BitplanError(f"no plan found within {target:,} bytes after 8 corrections")


def _rounded(plans: list[Plan], rounding: str) -> list[Plan]:
    """``plans`` recording the rounding they are meant for (what quantize applies by default)."""
    for plan in plans:
        plan.rounding = rounding
    return plans


def _check_budgets(
    space: PlanSpace, config: SearchConfig, log: Callable[[str], object] | None
) -> None:
    """Refuse a budget below what the options can reach, before the (long) scoring pass; say
    so when one is above it (its plan is then every group's largest option)."""
    lo, hi = space.reachable_range()
    reach = (
        f"({lo:.4f} to {hi:.4f} bits per weight"
        f"{'' if config.include_scales else ', scale bits ignored'})"
    )
    for bits in config.budgets:
        if bits < lo - 1e-12:
            raise BitplanError(
                f"target {bits:g} bits is below what {config.options_label} can reach here {reach}"
            )
        if bits > hi + 1e-12 and log is not None:
            log(
                f"note: target {bits:g} bits is above what {config.options_label} can use here "
                f"{reach}; its plan gives every layer the largest option ({hi:.4f} bits)"
            )


def budget_label(bits: float) -> str:
    """A budget as file names write it: 4.5 -> ``4p5``."""
    return f"{bits:g}".replace(".", "p")


def plan_file_name(plan: Plan) -> str:
    """``plan_bitplan_4p5.json``, ``plan_tail_6.json``, ``plan_llama.cpp_Q4_K_M_4p89.json``:
    recipe (anything but letters, digits, dots and dashes as ``_``) and budget."""
    recipe = re.sub(r"[^\w.-]+", "_", plan.recipe).strip("_")
    if plan.budget_avg_bits is None:
        return f"plan_{recipe}.json"
    return f"plan_{recipe}_{budget_label(plan.budget_avg_bits)}.json"


def _remove_other_searches_scores(out: Path, options: list[str]) -> None:
    """A recipe writes no scores: scores and front an earlier search of other options left in
    ``out`` would be read as this search's, so they go (with a note)."""
    old = out / "scores.json"
    try:
        stale = old.is_file() and json.loads(old.read_text()).get("options") != options
    except (OSError, ValueError, AttributeError):
        stale = True
    if stale:
        for name in ("scores.json", "front.json"):
            (out / name).unlink(missing_ok=True)
        print(
            f"note: removed {out}/scores.json and front.json of an earlier search of other options"
        )


def write_search_outputs(result: SearchResult, out: str | os.PathLike) -> list[Path]:
    """Write one plan file per plan, and for a scored search ``front.json`` and
    ``scores.json``, then ``bits_per_layer.png``. Returns the plan files' paths."""
    from bitplan.plots import plot_bits_per_layer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for plan in result.plans:
        path = out / plan_file_name(plan)
        plan.save(path)
        paths.append(path)
    if result.scores is not None:
        front = [{"avg_bits": b, "predicted_loss": s} for b, s in result.front]
        write_json_atomic(out / "front.json", front)
        result.scores.save(out / "scores.json")
    else:
        _remove_other_searches_scores(out, result.plans[0].options)
    plot_bits_per_layer(result.plans, result.table, out / "bits_per_layer.png")
    return paths
