"""A plan's GGUF file as a torch model: exactly the values the GGUF export stores, for comparing
with llama.cpp (docs/GGUF.md)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from bitplan.exporters.gguf_layout import gguf_layout
from bitplan.formats import Format
from bitplan.plans import Plan
from bitplan.quantization import quantized_input


@torch.no_grad()
def fake_quantize_gguf(
    model: object,
    plan: Plan,
    embedding_type: str | None = None,
    output_type: str | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    llama_cpp_activations: bool = False,
) -> nn.Module:
    """A copy of ``model.module`` (``model``: a ``LoadedModel``) holding exactly the values the
    GGUF export stores (planned layers, token embedding and output tensor
    quantize-dequantized), for comparing with llama.cpp. Row permutations commute with
    row-wise quantization, so no permuting is needed.

    With ``llama_cpp_activations`` every Linear also rounds its input as llama.cpp's CPU
    matmul does for the weight's type (``GGUFFormat.quantize_activation``), which leaves only
    summation-order differences.
    """
    importance = dict(importance or {})
    layout = gguf_layout(model, plan, embedding_type, output_type)
    module = copy.deepcopy(model.module)
    params = dict(module.named_parameters())
    stored_format: dict[int, Format] = {}
    for t in layout:
        if len(t.shape) != 2:
            continue  # F32 norms are stored exactly
        param = params[t.parameter]
        param.data = t.fmt.quantize_weight(param.data, t.importance(importance))
        stored_format[id(param)] = t.fmt
    if llama_cpp_activations:
        for linear in module.modules():
            if isinstance(linear, nn.Linear) and id(linear.weight) in stored_format:
                linear.register_forward_pre_hook(_rounding_hook(stored_format[id(linear.weight)]))
    return module


def _rounding_hook(fmt: Format) -> Callable:
    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        return (quantized_input(fmt, inputs[0]), *inputs[1:])

    return hook
