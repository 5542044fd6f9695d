"""Applying a plan as fake quantization: the "fake model" of the reference.

Every planned layer's weight is replaced by its quantize-dequantize under the layer's format, and
formats that quantize activations get their input quantized on the fly. The result is an ordinary
torch model (each planned ``nn.Linear`` becomes a ``FakeQuantLinear``, still an ``nn.Linear``)
that any evaluator can run.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format
from bitplan.formats.block_scaled import RoundedWeight


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is already quantize-dequantized and whose input is quantized
    on the fly when its format quantizes activations."""

    fmt: Format
    #: The codes and scales behind the weight when it was rounded otherwise than to nearest
    #: (GPTQ): what exports store. None for round-to-nearest.
    rounded: RoundedWeight | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: Format, rounded: RoundedWeight | None = None
    ) -> FakeQuantLinear:
        """``linear`` under ``fmt``: its weight rounded to nearest, or as ``rounded`` says (a
        weight rounded otherwise, e.g. by GPTQ)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            weight = (
                fmt.quantize_weight(linear.weight.data) if rounded is None else rounded.values()
            )
            new.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
        new.bias = linear.bias
        new.fmt = fmt
        new.rounded = rounded
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(quantized_input(self.fmt, x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.fmt.name}"


def quantized_input(fmt: Format, x: torch.Tensor) -> torch.Tensor:
    """The input a layer in ``fmt`` multiplies: ``x`` itself, or Q(x) if ``fmt`` quantizes
    activations. Straight-through: the forward value is quantized, while gradients (rounding has
    none) pass through unchanged, as in quantization-aware scoring and training."""
    if not fmt.quantizes_activations:
        return x
    xq = fmt.quantize_activation(x)
    return x + (xq - x).detach() if x.requires_grad else xq


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``root``'s submodule ``name`` is; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _resolve(formats: Mapping[str, Format | str]) -> dict[str, Format]:
    return {
        name: fmt if isinstance(fmt, Format) else parse_format(fmt) for name, fmt in formats.items()
    }


def apply_formats(
    model: nn.Module, formats: Mapping[str, Format | str], inplace: bool = False
) -> nn.Module:
    """Fake-quantize ``model``: layer name -> format (or format name). Layers not named, and
    layers whose format is ``bf16`` on a bf16 model, are left as they are.

    Returns a new model unless ``inplace``; the original is never modified otherwise.
    """
    resolved = _resolve(formats)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    missing = [name for name in resolved if name not in modules]
    if missing:
        raise BitplanError(
            f"the plan names {len(missing)} layer(s) this model does not have, e.g. {missing[0]}; "
            "was it made for another model?"
        )
    # Each FakeQuantLinear gets a new weight Parameter, so an lm_head tied to the embedding is
    # untied here and the embedding itself stays unquantized (unless a GGUF plan names it).
    for name, fmt in resolved.items():
        module = modules[name]
        if isinstance(module, nn.Embedding):  # looked up, not multiplied: only its table
            module.weight = nn.Parameter(fmt.quantize_weight(module.weight.data), False)
        elif isinstance(module, nn.Linear):
            replace_module(target, name, FakeQuantLinear.from_linear(module, fmt))
        else:
            raise BitplanError(f"{name} is a {type(module).__name__}, not a Linear layer")
    if hasattr(target, "config") and getattr(target.config, "tie_word_embeddings", False):
        # The head is now its own module; keep transformers from re-tying it on save/load.
        head = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None
        if isinstance(head, FakeQuantLinear):
            target.config.tie_word_embeddings = False
    return target


def rounded_weights(model: nn.Module) -> dict[str, RoundedWeight]:
    """Layer name -> the tuned codes and scales of every layer of a fake-quantized ``model``
    that was rounded otherwise than to nearest (``sequential.gptq_model``): what
    ``bitplan.exporters.export_model(..., rounded=...)`` stores."""
    return {
        name: module.rounded
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantLinear) and module.rounded is not None
    }


def apply_plan(model: nn.Module, plan, inplace: bool = False) -> nn.Module:
    """Fake-quantize ``model`` with a ``Plan`` (its layer -> format mapping)."""
    return apply_formats(model, plan.layer_formats, inplace=inplace)
