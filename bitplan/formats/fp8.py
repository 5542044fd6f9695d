"""FP8 (E4M3) weights per output channel, with dynamic per-token FP8 activations.

This is the "FP8_DYNAMIC" scheme of llm-compressor / vLLM:

* weights: one float32 scale per output row, ``scale = amax(row) / 448``;
  ``w' = e4m3(w / scale) * scale`` (nearest, ties to even, saturating at 448);
* activations: the same rule per token (per row of the last dimension), with the scale computed
  at run time from that token's own maximum.

Scales are float32 because that is what compressed-tensors checkpoints store and vLLM reads
for per-channel FP8. Rows of zeros dequantize to zeros.

Bits of an ``(out, in)`` weight: ``8 * out * in + 32 * out``.

In the block-scaled core (``block_scaled.py``) a row is one block. Stored (``storage.py``):
``qweight`` the E4M3 codes (the bytes of ``float8_e4m3fn``); ``scales`` float32 ``(out,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.formats.block_scaled import BlockScales, MinifloatBlockFormat
from bitplan.formats.blocks import check_weight_shape
from bitplan.formats.minifloat import E4M3

_SCALE_BITS = 32  # float32, one per output channel


@dataclass(frozen=True)
class FP8Format(MinifloatBlockFormat):
    """FP8 E4M3 per-channel weights and dynamic per-token activations."""

    name = "fp8"
    element = E4M3

    def block_size(self, length: int) -> int:
        return length  # one scale per row

    def find_scales(self, blocks: torch.Tensor) -> BlockScales:
        return BlockScales(blocks.abs().amax(dim=-1, keepdim=True) / E4M3.max_normal)

    def part_bits(self, shape: tuple[int, int]) -> dict[str, int]:
        out_features, in_features = check_weight_shape(shape)
        return {
            "qweight": out_features * in_features * E4M3.bits,
            "scales": out_features * _SCALE_BITS,
        }

    def pack_scales(self, scales: BlockScales) -> dict[str, torch.Tensor]:
        return {"scales": scales.scale.reshape(-1)}  # (out, 1, 1) -> (out,)

    def unpack_scales(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> BlockScales:
        return BlockScales(parts["scales"].float().reshape(shape[0], 1, 1))
