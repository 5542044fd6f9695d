"""FP8 (E4M3) weights per output channel, with dynamic per-token FP8 activations.

This is the "FP8_DYNAMIC" scheme of llm-compressor / vLLM:

* weights: one float32 scale per output row, ``scale = amax(row) / 448``;
  ``w' = e4m3(w / scale) * scale`` (nearest, ties to even, saturating at 448);
* activations: the same rule per token (per row of the last dimension), with the scale computed
  at run time from that token's own maximum.

Scales are float32 because that is what compressed-tensors checkpoints store and vLLM reads
for per-channel FP8. Rows of zeros dequantize to zeros.

Bits of an ``(out, in)`` weight: ``8 * out * in + 32 * out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.formats.base import Format
from bitplan.formats.blocks import as_float32, check_weight_shape
from bitplan.formats.minifloat import E4M3, quantize_to_minifloat

_ELEMENT_BITS = 8
_SCALE_BITS = 32  # float32, one per output channel


def fake_quantize_fp8_rowwise(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize float32 ``x`` to E4M3 with one scale per row of the last dimension."""
    scale = x.abs().amax(dim=-1, keepdim=True) / E4M3.max_normal
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    return quantize_to_minifloat(x / divisor, E4M3).mul_(scale)


@dataclass(frozen=True)
class FP8Format(Format):
    """FP8 E4M3 per-channel weights and dynamic per-token activations."""

    name = "fp8"
    quantizes_activations = True

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_fp8_rowwise(as_float32(weight)).to(weight.dtype)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_fp8_rowwise(as_float32(x)).to(x.dtype)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        out_features, in_features = check_weight_shape(shape)
        element_bits = out_features * in_features * _ELEMENT_BITS
        return element_bits + (out_features * _SCALE_BITS if include_scales else 0)
