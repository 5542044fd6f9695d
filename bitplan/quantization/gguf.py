"""A plan's GGUF file as a torch model: exactly the values the GGUF export stores, for comparing
with llama.cpp (docs/GGUF.md)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from bitplan.exporters.gguf_layout import gguf_layout
from bitplan.plans import Plan
from bitplan.quantization.llama_cpp import round_activations


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
    matmul does for the weight's type (``bitplan.quantization.llama_cpp``), which leaves only
    summation-order differences.
    """
    importance = dict(importance or {})
    layout = gguf_layout(model, plan, embedding_type, output_type)
    module = copy.deepcopy(model.module)
    params = dict(module.named_parameters())
    stored_type: dict[int, str] = {}
    for t in layout:
        if len(t.shape) != 2:
            continue  # F32 norms are stored exactly
        param = params[t.parameter]
        param.data = t.fmt.quantize_weight(param.data, t.importance(importance))
        stored_type[id(param)] = t.type_name
    if llama_cpp_activations:
        round_activations(module, stored_type)
    return module
