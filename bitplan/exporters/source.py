"""What an export reads from a model: its torch module, its layer table, and how to read a weight
that is still on disk (a streamed model).

Back ends take an ``ExportSource``, not a loaded model, so that ``bitplan.exporters`` needs nothing
from ``bitplan.model``; ``ExportSource.of(model)`` takes the parts from a
``bitplan.model.LoadedModel``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitplan.accounting import average_bits
from bitplan.errors import BitplanError
from bitplan.exporters.rounded_store import rounded_facts
from bitplan.formats import Format, parse_format
from bitplan.formats.block_scaled import RoundedWeight
from bitplan.plans import Plan, planning_table

if TYPE_CHECKING:
    from bitplan.model.layers import LayerTable


def _no_gguf() -> Path | None:
    return None


@dataclass(frozen=True)
class ExportSource:
    """The model an export writes."""

    module: nn.Module  # a transformers causal LM
    layers: LayerTable  # its quantizable Linear layers (bitplan.model.layers)
    tokenizer: object = None  # saved into folder exports when given
    name: str = "the model"  # for messages
    # Reads a tensor by name, for weights still on the meta device (a streamed model's blocks).
    weight_reader: Callable[[str], torch.Tensor] | None = None
    # The GGUF file the weights came from, if any (a GGUF export copies its tokenizer and
    # metadata); a function, so that it is looked for only by the export that needs it.
    find_gguf: Callable[[], Path | None] = _no_gguf
    # The folder or file the model was read from: an export must never replace it.
    origin: str | None = None
    # Layers rounded otherwise than to nearest (GPTQ): their codes and scales, stored as they
    # are. Every other planned layer is rounded to nearest by the export.
    rounded: Mapping[str, RoundedWeight] = field(default_factory=dict)

    @property
    def rounding(self) -> str:
        """How the planned weights are rounded, as exports record it: ``rtn`` (to nearest),
        ``gptq``, or several names joined by ``+``."""
        methods = sorted({facts.method for facts in rounded_facts(self.rounded).values()})
        return "+".join(methods) if methods else "rtn"

    @classmethod
    def of(cls, model: object) -> ExportSource:
        """``model`` if it is an ExportSource, else the parts of a ``LoadedModel`` (or of
        anything with its attributes) that an export reads."""
        if isinstance(model, cls):
            return model
        return cls(
            module=model.module,
            layers=model.layers,
            tokenizer=model.tokenizer,
            name=model.name,
            weight_reader=model.weight_reader,
            find_gguf=getattr(model, "source_gguf", _no_gguf),
            origin=getattr(model, "source", None),
        )

    def read(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values: from the weight reader if it is still on the meta device (a
        streamed model), else the tensor itself."""
        if tensor.is_meta:
            if self.weight_reader is None:
                raise BitplanError(f"{key} is not loaded (meta device) and the model has no reader")
            return self.weight_reader(key)
        return tensor.detach()

    def layer_weight(self, name: str) -> torch.Tensor:
        """The weight of Linear layer ``name`` (read from disk if streamed)."""
        return self.read(f"{name}.weight", self.module.get_submodule(name).weight)

    def quantized_weight(self, name: str, fmt: Format) -> torch.Tensor:
        """Layer ``name``'s quantize-dequantized weight under ``fmt``, in the weight's dtype:
        what ``FakeQuantLinear`` holds."""
        weight = self.layer_weight(name)
        rounded = self.rounded.get(name)
        return fmt.quantize_weight(weight) if rounded is None else rounded.values().to(weight.dtype)

    def encoded(self, name: str, fmt: Format) -> dict[str, torch.Tensor]:
        """The stored parts of layer ``name`` under ``fmt`` (``Format.encode``)."""
        rounded = self.rounded.get(name)
        if rounded is None:
            return fmt.encode(self.layer_weight(name))
        return fmt.encode_rounded(rounded)

    def head_name(self) -> str | None:
        head = self.layers.head()
        return head.name if head is not None else None


def planned_formats(source: ExportSource, plan: Plan) -> dict[str, Format]:
    """Layer name -> format for every layer of the plan, checked against the model: the one
    check of a plan before any export writes."""
    modules = dict(source.module.named_modules())
    formats = {name: parse_format(fmt_name) for name, fmt_name in plan.layer_formats.items()}
    table = planning_table(source.layers, [parse_format(name) for name in plan.options])
    embeddings = {layer.name for layer in table.layers if layer.role == "embedding"}
    for name in formats:
        module = modules.get(name)
        if module is None:
            raise BitplanError(
                f"the plan names layer {name}, which {source.name} does not have; "
                "was it made for another model?"
            )
        if not isinstance(module, nn.Linear) and name not in embeddings:
            raise BitplanError(f"{name} is a {type(module).__name__}, not a Linear layer")
    _check_plan_covers(table, source.name, plan)
    _check_plan_bits(table, source.name, plan, formats)
    return formats


def _check_plan_covers(table: LayerTable, model_name: str, plan: Plan) -> None:
    """A plan must cover every layer it budgets (an absent one would silently stay unquantized:
    the model would not have the plan's bits) and agree with its own fusion groups."""
    groups = table.groups(plan.include_head)
    missing = [layer.name for layers in groups.values() for layer in layers
               if layer.name not in plan.layer_formats]  # fmt: skip
    if missing:
        raise BitplanError(
            f"the plan does not cover {len(missing)} layer(s) of {model_name}, e.g. "
            f"{missing[0]}; was it edited, or made for another model? (a layer meant to stay "
            "unquantized is listed as bf16)"
        )
    for group, fmt_name in plan.group_formats.items():
        for layer in groups.get(group, []):
            if plan.layer_formats[layer.name] != fmt_name:
                raise BitplanError(
                    f"the plan gives {layer.name} {plan.layer_formats[layer.name]} but its "
                    f"fusion group {group} {fmt_name}; was it edited? make the two agree"
                )


def _check_plan_bits(
    table: LayerTable, model_name: str, plan: Plan, formats: dict[str, Format]
) -> None:
    """The plan's layers must cost what the plan says and stay within its budget: an edited plan
    would otherwise export a model of other bits than the one the plan file reports."""
    budgeted = table.selected(plan.include_head)
    bits = average_bits(budgeted, formats, include_scales=plan.include_scales)
    counted = "with" if plan.include_scales else "without"
    if not math.isclose(bits, plan.avg_bits, rel_tol=1e-9, abs_tol=1e-9):
        raise BitplanError(
            f"the plan says {plan.avg_bits:.4f} average bits but its layers cost {bits:.4f} on "
            f"{model_name} (scales counted: {counted}); was it edited, or made for another model?"
        )
    budget = plan.budget_avg_bits
    if budget is not None and bits > budget + 1e-9:
        raise BitplanError(
            f"the plan's layers average {bits:.4f} bits, over its budget of {budget:g}; was it "
            "edited? search again, or make a plan with a larger budget"
        )
