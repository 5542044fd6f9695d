"""BF16: the unquantized baseline. Weights are rounded to bfloat16 (a no-op for bf16 models).

Stored (``storage.py``): ``weight``, the weight in bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.formats.base import Format
from bitplan.formats.blocks import as_float32, check_float_tensor, check_weight_shape
from bitplan.formats.storage import check_parts

_BF16_BITS = 16


@dataclass(frozen=True)
class BF16Format(Format):
    """16 bits per weight, no scales, activations untouched."""

    name = "bf16"

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        check_float_tensor(weight)
        # copy=True: a bf16 input must still come back as a new tensor, never as an alias.
        return weight.to(torch.bfloat16, copy=True).to(weight.dtype)

    def part_bits(self, shape: tuple[int, int]) -> dict[str, int]:
        out_features, in_features = check_weight_shape(shape)
        return {"weight": out_features * in_features * _BF16_BITS}

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        return self.part_bits(shape)["weight"]

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": as_float32(weight.detach()).to(torch.bfloat16)}

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        check_parts(self, parts, shape)
        return parts["weight"].float()
