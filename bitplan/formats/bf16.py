"""BF16: the unquantized baseline. Weights are rounded to bfloat16 (a no-op for bf16 models)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.formats.base import Format
from bitplan.formats.blocks import check_float_tensor, check_weight_shape

_BF16_BITS = 16


@dataclass(frozen=True)
class BF16Format(Format):
    """16 bits per weight, no scales, activations untouched."""

    name = "bf16"

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        check_float_tensor(weight)
        # copy=True: a bf16 input must still come back as a new tensor, never as an alias.
        return weight.to(torch.bfloat16, copy=True).to(weight.dtype)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        out_features, in_features = check_weight_shape(shape)
        return out_features * in_features * _BF16_BITS
