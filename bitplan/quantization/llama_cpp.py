"""How llama.cpp's CPU matmuls round their activations: each weight type has a ``vec_dot_type``
into which the input is quantized first (8-bit blocks: Q8_0 for Q4_0 ... Q8_0, MXFP4 and IQ4_NL,
Q8_K for the k-quants and the other i-quants, as their ``ggml_vec_dot_<type>_q8_K`` kernels
say; bf16 / f16 for those types). ``round_activations(module, stored_types)`` adds
that rounding to a torch model, which then differs from llama.cpp only by summation order."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

Rounding = Callable[[torch.Tensor], torch.Tensor]


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml-cpu's ``quantize_row_q8_0``: blocks of 32, fp16 scale amax / 127, ties to even."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = (amax / 127).half().float()
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q8_K_ref``: blocks of 256, scale from the signed largest value."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 256)
    index = blocks.abs().argmax(-1, keepdim=True)
    peak = blocks.gather(-1, index)
    inverse = torch.where(peak != 0, -127 / peak, torch.zeros_like(peak))
    codes = torch.round(inverse * blocks).clamp(max=127)
    scale = torch.where(peak != 0, 1 / inverse, torch.zeros_like(peak))
    return (codes * scale).reshape(x.shape)


def _round_to(dtype: torch.dtype) -> Rounding:
    return lambda x: x.to(dtype).float()


#: llama.cpp's CPU ``vec_dot_type``: how a matmul rounds its activations for each weight type.
ACTIVATION_ROUNDING: dict[str, Rounding] = {
    **dict.fromkeys(["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "IQ4_NL"], round_q8_0),
    **dict.fromkeys(
        ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ3_S", "IQ3_XXS"]
        + ["IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"],
        round_q8_k,
    ),
    "BF16": _round_to(torch.bfloat16),
    "F16": _round_to(torch.float16),
}


def _rounding_hook(rounding: Rounding) -> Callable:
    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        return (rounding(x).to(x.dtype), *inputs[1:])

    return hook


def round_activations(module: nn.Module, stored_types: Mapping[int, str]) -> None:
    """Make every Linear of ``module`` whose weight is stored in a llama.cpp type round its input
    as llama.cpp does; ``stored_types``: ``id(weight)`` -> type name ("Q4_K", "BF16" ...)."""
    for linear in module.modules():
        if isinstance(linear, nn.Linear) and id(linear.weight) in stored_types:
            rounding = ACTIVATION_ROUNDING.get(stored_types[id(linear.weight)])
            if rounding is not None:
                linear.register_forward_pre_hook(_rounding_hook(rounding))
