"""How llama.cpp's CPU matmuls round their activations: each weight type has a ``vec_dot_type``
into which the input is quantized first (8-bit blocks: Q8_0 for Q4_0 ... Q8_0, MXFP4 and IQ4_NL,
Q8_K for the k-quants and the other i-quants, as their ``ggml_vec_dot_<type>_q8_K`` kernels
say; bf16 / f16 for those types). ``GGMLType.activations`` names it for each type, and
``round_activations(kind, x)`` applies it, so that a torch model of a GGUF file differs from
llama.cpp only by summation order. The scores count this error too: on Gemma-3-270M, Q8_K's
256-wide blocks in ``ffn_down`` are about half of a Q4_K_M file's KL (docs/RESULTS.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch


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


def _round_to(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.to(dtype).float()


#: llama.cpp's ``vec_dot_type`` names (Q8_1 rounds values as Q8_0 does) -> the rounding.
ROUNDINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": round_q8_0,
    "Q8_K": round_q8_k,
    "BF16": _round_to(torch.bfloat16),
    "F16": _round_to(torch.float16),
    "F32": lambda x: x.float(),
}


def round_activations(kind: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in_features) as llama.cpp's CPU matmul rounds it for a weight whose type's
    ``vec_dot_type`` is ``kind`` (a key of :data:`ROUNDINGS`), in ``x``'s dtype."""
    return ROUNDINGS[kind](x).to(x.dtype)
