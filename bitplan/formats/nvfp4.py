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

Stored (``storage.py``): ``qweight`` the E2M1 codes bit-packed; ``scales`` the block scales as
``float8_e4m3fn`` ``(out, ceil(in / 16))``; ``global_scale`` float32 ``(1,)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitplan.formats.block_scaled import BlockScales, MinifloatBlockFormat
from bitplan.formats.blocks import blocks_per_row, check_weight_shape
from bitplan.formats.minifloat import E2M1, E4M3, quantize_to_minifloat

NVFP4_BLOCK_SIZE = 16
_BLOCK_SCALE_BITS = 8  # E4M3
_GLOBAL_SCALE_BITS = 32  # float32


@dataclass(frozen=True)
class NVFP4Format(MinifloatBlockFormat):
    """NVIDIA's NVFP4 for weights and (dynamically scaled) activations."""

    name = "nvfp4"
    element = E2M1

    def block_size(self, length: int) -> int:
        return NVFP4_BLOCK_SIZE

    def find_scales(self, blocks: torch.Tensor) -> BlockScales:
        """The E4M3 block scales and the float32 global scale (see the module doc).

        The tensor's amax is the largest block amax (padding zeros change neither).
        """
        block_amax = blocks.abs().amax(dim=-1, keepdim=True)
        global_scale = block_amax.max() / (E2M1.max_normal * E4M3.max_normal)
        return _under_global_scale(block_amax, global_scale)

    def group_scale_rule(self, blocks: torch.Tensor) -> Callable[[torch.Tensor], BlockScales]:
        """Block scales under the global scale of the whole ``blocks``, fixed (a block that
        grows past the tensor's amax gets the largest E4M3 scale and clips)."""
        global_scale = self.find_scales(blocks).global_scale

        def rule(some: torch.Tensor) -> BlockScales:
            return _under_global_scale(some.abs().amax(dim=-1, keepdim=True), global_scale)

        return rule

    def part_bits(self, shape: tuple[int, int]) -> dict[str, int]:
        out_features, in_features = check_weight_shape(shape)
        blocks = out_features * blocks_per_row(in_features, NVFP4_BLOCK_SIZE)
        return {
            "qweight": out_features * in_features * E2M1.bits,
            "scales": blocks * _BLOCK_SCALE_BITS,
            "global_scale": _GLOBAL_SCALE_BITS,
        }

    def pack_scales(self, scales: BlockScales) -> dict[str, torch.Tensor]:
        return {
            "scales": scales.scale.squeeze(-1).to(torch.float8_e4m3fn),
            "global_scale": scales.global_scale.reshape(1).float(),
        }

    def unpack_scales(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> BlockScales:
        block_scale = parts["scales"].float().unsqueeze(-1)
        return BlockScales(block_scale, global_scale=parts["global_scale"].float().reshape(()))


def _under_global_scale(block_amax: torch.Tensor, global_scale: torch.Tensor) -> BlockScales:
    """The E4M3 block scales of blocks with amax ``block_amax`` under ``global_scale``."""
    safe_global = torch.where(global_scale > 0, global_scale, 1.0)  # all-zero tensor
    block_scale = quantize_to_minifloat(block_amax / E2M1.max_normal / safe_global, E4M3)
    return BlockScales(block_scale, global_scale=global_scale)
