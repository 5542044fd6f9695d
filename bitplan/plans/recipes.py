"""llama.cpp's own mixes (Q4_K_M ...) as bitplan Plans, and GGUF plans solved per tensor.

``llama-quantize`` chooses a type for every tensor with hand-written rules
(``llama_tensor_get_type_impl`` in ``llama-quant.cpp``): the mix's base type everywhere, with
some tensors promoted. :func:`llama_cpp_mix_plan` reproduces those rules for dense
llama-architecture models (no experts, not Falcon, not a 70B), so that a bitplan plan can be
compared with the rule at the same file size; llama.cpp's fallback for rows its blocks do not
divide is applied by the formats themselves (``bitplan/formats/gguf.py``).

The rules, with ``more_bits(i)`` = ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` over the
``n`` blocks (integer division), for the mixes listed in :data:`LLAMA_CPP_MIXES`:

====== ===================================== ========================== ================
mix    attn_v                                ffn_down                   attn_output
====== ===================================== ========================== ================
Q2_K   q4_k if n_head/n_kv >= 4 else q3_k   q3_k                       q3_k
Q3_K_M q5_k in blocks 0-1, else q4_k        q5_k if i < n/16, else q4_k q4_k
Q3_K_L q5_k                                  q5_k                       q5_k
Q4_K_S q5_k in blocks 0-3                    q5_k if i < n/8            (base)
Q4_K_M q6_k if more_bits(i)                  q6_k if more_bits(i)       (base)
Q5_K_M q6_k if more_bits(i)                  q6_k if more_bits(i)       (base)
====== ===================================== ========================== ================

Everything else (q, k, gate, up) keeps the base type. The output tensor (and a token embedding
tied to it) is Q6_K, Q8_0 when its rows do not divide into 256-blocks; an untied token embedding
keeps the base type — the export's ``output_type`` / ``embedding_type`` from
:func:`mix_tensor_types`.

GGUF files store every tensor separately, so GGUF plans need no fusion groups:
:func:`ungrouped` gives each layer its own group, and :func:`solve_gguf_plans` solves per tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from bitplan.accounting import average_bits
from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format
from bitplan.model.fingerprint import model_fingerprint
from bitplan.model.layers import LayerTable
from bitplan.model.loading import LoadedModel
from bitplan.plans.build import solve_plans
from bitplan.plans.plan import Plan
from bitplan.score.scores import Scores

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
}
#: The llama.cpp mixes this module reproduces.
LLAMA_CPP_MIXES = tuple(_BASE_TYPE)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the blocks, and every third
    block in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_layer_type(mix: str, role: str, block: int, n_blocks: int, gqa: int) -> str:
    """The format llama.cpp's ``mix`` requests for one decoder layer (before fallback)."""
    base = _BASE_TYPE[mix]
    if role == "v":
        if mix == "Q2_K":
            return "q4_k" if gqa >= 4 else "q3_k"
        if mix == "Q3_K_M":
            return "q5_k" if block < 2 else "q4_k"
        if mix == "Q3_K_L":
            return "q5_k"
        if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(block, n_blocks):
            return "q6_k"
        if mix == "Q4_K_S" and block < 4:
            return "q5_k"
    elif role == "down":
        if mix == "Q2_K":
            return "q3_k"
        if mix == "Q3_K_M":
            return "q5_k" if block < n_blocks // 16 else "q4_k"
        if mix == "Q3_K_L":
            return "q5_k"
        if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(block, n_blocks):
            return "q6_k"
        if mix == "Q4_K_S" and block < n_blocks // 8:
            return "q5_k"
    elif role == "o":
        return {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(mix, base)
    return base


def mix_tensor_types(mix: str) -> tuple[str, str]:
    """(embedding_type, output_type) that llama.cpp's ``mix`` gives an untied token embedding
    and the output tensor (a tied embedding follows the output)."""
    _check_mix(mix)
    return _BASE_TYPE[mix], "q6_k"


def _check_mix(mix: str) -> None:
    if mix not in _BASE_TYPE:
        raise BitplanError(f"unknown llama.cpp mix {mix!r}; known: {', '.join(LLAMA_CPP_MIXES)}")


def ungrouped(table: LayerTable) -> LayerTable:
    """The same layers, each in its own group: a GGUF file stores every tensor separately."""
    layers = tuple(dataclasses.replace(layer, group=layer.name) for layer in table.layers)
    return dataclasses.replace(table, layers=layers)


def _model_id(model: LoadedModel) -> str:
    return f"{model.name}@{model_fingerprint(model.module)}"


def plan_from_formats(
    model: LoadedModel, layer_formats: dict[str, str], recipe: str, model_id: str | None = None
) -> Plan:
    """A Plan for the decoder layers of ``model`` with the given layer -> format names."""
    layers = model.layers.decoder_layers()
    missing = [layer.name for layer in layers if layer.name not in layer_formats]
    if missing:
        raise BitplanError(f"no format for {len(missing)} layer(s), e.g. {missing[0]}")
    formats = {name: parse_format(fmt) for name, fmt in layer_formats.items()}
    with_scales = average_bits(layers, formats, include_scales=True)
    return Plan(
        model=model_id or _model_id(model),
        recipe=recipe,
        options=sorted({fmt.name for fmt in formats.values()}),
        layer_formats={layer.name: formats[layer.name].name for layer in layers},
        budget_avg_bits=None,
        avg_bits=with_scales,
        avg_bits_with_scales=with_scales,
        avg_bits_without_scales=average_bits(layers, formats, include_scales=False),
        include_scales=True,
        include_head=False,
        group_formats={layer.name: formats[layer.name].name for layer in layers},
    )


def llama_cpp_mix_plan(
    model: LoadedModel, mix: str = "Q4_K_M", model_id: str | None = None
) -> Plan:
    """llama.cpp's ``mix`` (``"Q4_K_M"`` ...) for the decoder layers of ``model``, as a Plan."""
    _check_mix(mix)
    config = model.module.config
    gqa = config.num_attention_heads // config.num_key_value_heads
    n_blocks = model.layers.num_blocks
    layer_formats = {}
    for layer in model.layers.decoder_layers():
        if layer.role not in ("q", "k", "v", "o", "gate", "up", "down"):
            raise BitplanError(f"llama.cpp's mixes know no layer like {layer.name}")
        layer_formats[layer.name] = mix_layer_type(mix, layer.role, layer.block, n_blocks, gqa)
    return plan_from_formats(model, layer_formats, f"llama.cpp {mix}", model_id)


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
    return solve_plans(
        ungrouped(model.layers),
        formats,
        scores,
        list(budgets),
        model_id or _model_id(model),
        include_head=False,
        include_scales=True,
    )
