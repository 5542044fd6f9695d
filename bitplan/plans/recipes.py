"""Plans made by a rule rather than by the solver, and plans solved without fusion groups.

**Baselines** (``bitplan search --recipe``, ``bitplan compare``), as auto-round's accuracy report
defines them: ``uniform`` puts every unit at the cheapest option; ``head`` promotes whole decoder
blocks to the most expensive option starting from the block nearest the *output* (the lm_head
end), ``tail`` starting from the block nearest the *input* (the embedding), while the budget
allows. (These "head" and "tail" are ends of the block stack; they have nothing to do with the
lm_head layer, which ``include_head`` is about.)

**Unfused plans**: bitplan's solver with every layer choosing its own format, without the fusion
groups (q/k/v, gate/up) an engine shares a format across. GGUF files store every tensor
separately, so GGUF plans are solved this way (:func:`solve_gguf_plans`); so is the ablation that
gives bitplan the per-layer freedom auto-round's AutoScheme has.

**llama.cpp's own mixes** (Q4_K_M ...) as bitplan Plans. ``llama-quantize`` chooses a type for
every tensor with hand-written rules (``llama_tensor_get_type_impl`` in ``llama-quant.cpp``): the
mix's base type everywhere, with some tensors promoted. :func:`llama_cpp_mix_plan` reproduces
those rules for dense llama-architecture models (no experts, not Falcon, not a 70B), so that a
bitplan plan can be compared with the rule at the same file size; llama.cpp's fallback for rows
its blocks do not divide is applied by the formats themselves (``bitplan/formats/gguf.py``).
``tests/test_gguf_mixes.py`` checks every mix against ``llama_model_quantize``, file for file.

The rules, with ``more_bits(i)`` = ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` over the
``n`` blocks (integer division) and ``gqa`` = attention heads / KV heads, for the mixes listed in
:data:`LLAMA_CPP_MIXES` (Q3_K_S, Q5_K_S and Q6_K are their base type everywhere):

====== ======= ============================= =========================== ===========
mix    base    attn_v                        ffn_down                    attn_output
====== ======= ============================= =========================== ===========
Q2_K   q2_k    q4_k if gqa >= 4 else q3_k    q3_k                        q3_k
Q3_K_M q3_k    q5_k in blocks 0-1, else q4_k q5_k if i < n/16, else q4_k q4_k
Q3_K_L q3_k    q5_k                          q5_k                        q5_k
Q4_K_S q4_k    q5_k in blocks 0-3            q5_k if i < n/8             (base)
Q4_K_M q4_k    q6_k if more_bits(i)          q6_k if more_bits(i)        (base)
Q5_K_M q5_k    q6_k if more_bits(i)          q6_k if more_bits(i)        (base)
IQ2_M  iq2_s   q4_k if gqa >= 4 else iq3_s   iq3_s if i < n/8            iq3_s
IQ3_M  iq3_s   q4_k                          q4_k if i < n/8             q4_k
IQ4_XS iq4_xs  q5_k if gqa >= 4              q5_k if i < n/8, no imatrix (base)
====== ======= ============================= =========================== ===========

Everything else (q, k, gate, up) keeps the base type. The output tensor (and a token embedding
tied to it) is Q6_K (Q5_K for IQ2_M), Q8_0 when its rows do not divide into 256-blocks; an
untied token embedding keeps the base type (IQ3_S for IQ2_M) — the export's ``output_type`` /
``embedding_type`` from :func:`mix_tensor_types`. IQ2_M's iq2_s needs an importance matrix
(llama-quantize refuses it without one, and so does the format); IQ4_XS's rule depends on
whether one is given (``llama_cpp_mix_plan(..., imatrix=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format
from bitplan.model.layers import LayerTable
from bitplan.plans.build import PlanSpace, plan_from_formats
from bitplan.plans.plan import Plan
from bitplan.solve import promote_blocks, uniform

if TYPE_CHECKING:
    from bitplan.model.loading import LoadedModel
    from bitplan.scoring.scores import Scores

#: Recipes that promote whole blocks while a budget allows, so they need one.
BUDGETED_RECIPES = ("head", "tail")
#: The baseline recipes: ``bitplan search --recipe`` and ``bitplan compare`` settings.
RECIPES = ("uniform", *BUDGETED_RECIPES)


def recipe_plan(
    space: PlanSpace,
    recipe: str,
    budget: float | None,
    model_id: str,
    scores: Scores | None = None,
) -> Plan:
    """A baseline plan over ``space``: ``uniform`` (all the cheapest option), ``head`` /
    ``tail`` (whole blocks nearest the output / the embedding promoted to the most expensive
    option while the budget allows)."""
    if recipe not in RECIPES:
        raise BitplanError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    units = space.scored_units(scores)
    probe = units[0]
    low = min(probe.costs, key=probe.costs.__getitem__)
    high = max(probe.costs, key=probe.costs.__getitem__)
    if recipe == "uniform":
        solution = uniform(units, low, pins=space.pins)
    else:
        if budget is None:
            raise BitplanError(f"the {recipe} recipe needs a budget (--avg-bits)")
        from_output = recipe == "head"  # else "tail": from the embedding end
        solution = promote_blocks(units, low, high, budget, space.pins, from_output=from_output)
    return space.plan(solution, model_id, recipe)


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
    """:func:`recipe_plan` for a layer table and formats."""
    space = PlanSpace.build(table, formats, include_head, include_scales, pins)
    return recipe_plan(space, recipe, budget, model_id, scores)


def solve_unfused_plans(
    table: LayerTable,
    formats: Sequence[Format],
    scores: Scores,
    budgets: Sequence[float],
    model_id: str,
    include_scales: bool = True,
    recipe: str = "bitplan-unfused",
) -> list[Plan]:
    """bitplan's least-loss plans at each budget with every decoder layer choosing its own
    format (no fusion groups)."""
    space = PlanSpace.build(table.ungrouped(), formats, include_scales=include_scales)
    return space.solve(scores, budgets, model_id, recipe)


# --------------------------------------------------------------------------------------------
# llama.cpp's mixes
# --------------------------------------------------------------------------------------------

_BASE_TYPE = {
    "Q2_K": "q2_k",
    "Q3_K_S": "q3_k",
    "Q3_K_M": "q3_k",
    "Q3_K_L": "q3_k",
    "Q4_K_S": "q4_k",
    "Q4_K_M": "q4_k",
    "Q5_K_S": "q5_k",
    "Q5_K_M": "q5_k",
    "Q6_K": "q6_k",
    "IQ2_M": "iq2_s",
    "IQ3_M": "iq3_s",
    "IQ4_XS": "iq4_xs",
}
#: The llama.cpp mixes this module reproduces.
LLAMA_CPP_MIXES = tuple(_BASE_TYPE)
#: Mixes whose output tensor is Q5_K rather than Q6_K (llama.cpp's 1- and 2-bit i-quant mixes).
_Q5_K_OUTPUT = ("IQ2_M",)
#: Untied token embeddings that differ from the mix's base type.
_EMBEDDING_TYPE = {"IQ2_M": "iq3_s"}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the blocks, and every third
    block in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_layer_type(
    mix: str, role: str, block: int, n_blocks: int, gqa: int, *, imatrix: bool = False
) -> str:
    """The format llama.cpp's ``mix`` requests for one decoder layer (before fallback);
    ``imatrix``: whether llama-quantize is given an importance matrix (IQ4_XS then keeps its
    first ffn_down blocks at the base type)."""
    base = _BASE_TYPE[mix]
    first_eighth = block < n_blocks // 8
    if role == "v":
        if mix == "IQ2_M":
            return "q4_k" if gqa >= 4 else "iq3_s"
        if mix == "Q2_K":
            return "q4_k" if gqa >= 4 else "q3_k"
        if mix == "IQ3_M":
            return "q4_k"
        if mix == "Q3_K_M":
            return "q5_k" if block < 2 else "q4_k"
        if mix == "Q3_K_L":
            return "q5_k"
        if mix == "IQ4_XS" and gqa >= 4:
            return "q5_k"
        if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(block, n_blocks):
            return "q6_k"
        if mix == "Q4_K_S" and block < 4:
            return "q5_k"
    elif role == "down":
        if mix == "IQ2_M":
            return "iq3_s" if first_eighth else base
        if mix == "Q2_K":
            return "q3_k"
        if mix == "Q3_K_M":
            return "q5_k" if block < n_blocks // 16 else "q4_k"
        if mix == "IQ3_M" and first_eighth:
            return "q4_k"
        if mix == "Q3_K_L":
            return "q5_k"
        if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(block, n_blocks):
            return "q6_k"
        if mix == "IQ4_XS" and first_eighth and not imatrix:
            return "q5_k"
        if mix == "Q4_K_S" and first_eighth:
            return "q5_k"
    elif role == "o":
        return {
            "Q2_K": "q3_k",
            "Q3_K_M": "q4_k",
            "Q3_K_L": "q5_k",
            "IQ2_M": "iq3_s",
            "IQ3_M": "q4_k",
        }.get(mix, base)
    return base


def mix_tensor_types(mix: str, hidden_size: int | None = None) -> tuple[str, str]:
    """(embedding_type, output_type) that llama.cpp's ``mix`` gives an untied token embedding
    and the output tensor (a tied embedding follows the output).

    Both tensors have rows of ``hidden_size`` weights: when 256 does not divide it, llama.cpp
    writes the output in Q8_0, whatever the mix (for Q6_K that is also its fallback, but not
    for the Q5_K of IQ2_M, whose fallback would be Q5_1). Without ``hidden_size`` the output
    type assumes rows that 256 divides."""
    check_mix(mix)
    if hidden_size is not None and hidden_size % 256:
        output = "q8_0"
    else:
        output = "q5_k" if mix in _Q5_K_OUTPUT else "q6_k"
    return _EMBEDDING_TYPE.get(mix, _BASE_TYPE[mix]), output


def check_mix(mix: str, imatrix: bool = True) -> None:
    """Refuse a name that is not one of the llama.cpp mixes bitplan reproduces, or (without an
    ``imatrix``) a mix whose types llama-quantize makes only with an importance matrix."""
    if mix not in _BASE_TYPE:
        raise BitplanError(f"unknown llama.cpp mix {mix!r}; known: {', '.join(LLAMA_CPP_MIXES)}")
    if not imatrix and parse_format(_BASE_TYPE[mix]).requires_importance:
        raise BitplanError(f"llama.cpp's {mix} needs an importance matrix: add --imatrix")


def llama_cpp_mix_plan(
    model: LoadedModel, mix: str = "Q4_K_M", model_id: str | None = None, *, imatrix: bool = False
) -> Plan:
    """llama.cpp's ``mix`` (``"Q4_K_M"`` ...) for the decoder layers of ``model``, as a Plan;
    ``imatrix``: as llama-quantize chooses when given an importance matrix (which the IQ2_M mix
    needs, and which changes IQ4_XS's rule)."""
    check_mix(mix)
    config = model.module.config
    gqa = config.num_attention_heads // config.num_key_value_heads
    n_blocks = model.layers.num_blocks
    layer_formats = {}
    for layer in model.layers.decoder_layers():
        if layer.role not in ("q", "k", "v", "o", "gate", "up", "down"):
            raise BitplanError(f"llama.cpp's mixes know no layer like {layer.name}")
        layer_formats[layer.name] = mix_layer_type(
            mix, layer.role, layer.block, n_blocks, gqa, imatrix=imatrix
        )
    recipe = f"llama.cpp {mix}" + (" (imatrix)" if imatrix else "")
    return plan_from_formats(model, layer_formats, recipe, model_id)


def uniform_gguf_plan(model: LoadedModel, fmt: str, model_id: str | None = None) -> Plan:
    """Every decoder layer in one GGUF format (with llama.cpp's fallback where rows need it)."""
    name = parse_format(fmt).name
    layer_formats = {layer.name: name for layer in model.layers.decoder_layers()}
    return plan_from_formats(model, layer_formats, f"uniform {name}", model_id)


def solve_gguf_plans(
    model: LoadedModel,
    formats: Sequence[Format | str],
    scores: Scores,
    budgets: Sequence[float],
    model_id: str | None = None,
) -> list[Plan]:
    """bitplan's least-loss plans at each budget (average bits of the decoder layers, scales
    included, as stored), choosing a type for every tensor separately."""
    formats = [fmt if isinstance(fmt, Format) else parse_format(fmt) for fmt in formats]
    return solve_unfused_plans(
        model.layers, formats, scores, budgets, model_id or model.identity, recipe="bitplan"
    )
