"""NVFP4: E2M1 elements in blocks of 16 with an E4M3 block scale and an FP32 tensor scale.

Rule (as NVIDIA's TensorRT Model Optimizer and compressed-tensors do it):

* ``global_scale = amax(tensor) / (6 * 448)`` — one float32 per tensor, chosen so that the
  largest block scale lands at E4M3's maximum 448 and the largest element at E2M1's maximum 6;
* for each block of 16 along the last dimension, ``block_scale = amax(block) / 6 /
  global_scale``, rounded to E4M3 (nearest, ties to even, saturating at 448);
* ``element = e2m1(x / (block_scale * global_scale))`` (nearest, ties to even, saturating at 6);
* ``x' = element * block_scale * global_scale``.

A block whose E4M3 scale rounds to 0 (a block tiny next to the tensor's maximum) dequantizes to
zeros, and so does an all-zero tensor.

Activations are quantized too, block-wise along the last dimension. Here the global scale is
dynamic: computed from each activation tensor's own maximum. Real engines (vLLM, TensorRT-LLM)
use a static activation global scale calibrated offline, which can only clip more or use the
E4M3 range less well, so ours is the optimistic end.

Bits of an ``(out, in)`` weight: ``4 * out * in + 8 * out * ceil(in / 16) + 32``, that is
4.5 bits per weight plus 32 / numel (ragged last blocks have their own scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.formats.base import Format
from bitplan.formats.blocks import (
    as_float32,
    blocks_per_row,
    check_weight_shape,
    from_blocks,
    to_blocks,
)
from bitplan.formats.minifloat import E2M1, E4M3, quantize_to_minifloat

NVFP4_BLOCK_SIZE = 16
_ELEMENT_BITS = 4
_BLOCK_SCALE_BITS = 8  # E4M3
_GLOBAL_SCALE_BITS = 32  # float32


def nvfp4_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 global scale (0-d) and the E4M3 block scales (last dimension kept to 1).

    ``global_scale = amax(tensor) / (6 * 448)``; ``block_scale = e4m3(amax(block) / 6 /
    global_scale)``. The tensor's amax is the largest block amax (padding zeros change neither).
    """
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    global_scale = block_amax.max() / (E2M1.max_normal * E4M3.max_normal)
    safe_global = torch.where(global_scale > 0, global_scale, 1.0)  # all-zero tensor
    block_scale = quantize_to_minifloat(block_amax / E2M1.max_normal / safe_global, E4M3)
    return global_scale, block_scale


def fake_quantize_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize float32 ``x`` to NVFP4 along its last dimension."""
    length = x.shape[-1]
    blocks = to_blocks(x, NVFP4_BLOCK_SIZE)
    global_scale, block_scale = nvfp4_scales(blocks)
    full_scale = block_scale * global_scale
    divisor = torch.where(full_scale > 0, full_scale, torch.ones_like(full_scale))
    elements = quantize_to_minifloat(blocks / divisor, E2M1)
    # element * block_scale is exact (2 and 4 significant bits), so this rounds only once.
    return from_blocks(elements.mul_(block_scale).mul_(global_scale), length)


@dataclass(frozen=True)
class NVFP4Format(Format):
    """NVIDIA's NVFP4 for weights and (dynamically scaled) activations."""

    name = "nvfp4"
    quantizes_activations = True

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_nvfp4(as_float32(weight)).to(weight.dtype)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_nvfp4(as_float32(x)).to(x.dtype)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        out_features, in_features = check_weight_shape(shape)
        element_bits = out_features * in_features * _ELEMENT_BITS
        if not include_scales:
            return element_bits
        blocks = out_features * blocks_per_row(in_features, NVFP4_BLOCK_SIZE)
        return element_bits + blocks * _BLOCK_SCALE_BITS + _GLOBAL_SCALE_BITS
