"""OCP Microscaling (MX) v1.0 formats: MXFP4, MXFP6, MXFP8.

Blocks of 32 consecutive elements along the last dimension share one 8-bit E8M0 scale, a power
of two. For each block (OCP MX spec v1.0, section 6.3):

* ``shared_exp = floor(log2(max|x|)) - emax_elem``, clamped to E8M0's range [-127, 127], where
  ``emax_elem`` is the exponent of the element type's largest power of two (2 for E2M1 and
  E2M3, 8 for E4M3);
* ``scale = 2**shared_exp``;
* each element is ``x / scale`` rounded to the element grid (nearest, ties to even), saturating
  at the element's largest value; ``x' = element * scale``.

An all-zero block gets the smallest scale and stays all zeros. Because ``max|x| / scale`` lies
in ``[2**emax, 2**(emax+1))`` and the element grid stops below ``2**(emax+1)`` (at 6, 7.5 or
448), the largest elements of a block may saturate: that is the spec's rule, not a bug.

Both weights and activations are quantized. Activations are quantized dynamically with the same
rule, block-wise along the last dimension of a tensor of any rank.

Ragged last block: when the last dimension is not a multiple of 32 the last block of each row is
shorter and has its own scale (as if zero-padded). Bits of an ``(out, in)`` weight:
``out * in * element_bits + out * ceil(in / 32) * 8``, e.g. 4.25 bits per weight for MXFP4.

Stored (``storage.py``): ``qweight`` the element codes bit-packed; ``scales`` the E8M0 scales,
``shared_exp + 127`` as uint8 ``(out, ceil(in / 32))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.errors import BitplanError
from bitplan.formats.block_scaled import BlockScales, MinifloatBlockFormat
from bitplan.formats.blocks import blocks_per_row, check_weight_shape
from bitplan.formats.minifloat import (
    E2M1,
    E2M3,
    E4M3,
    MinifloatSpec,
    floor_log2,
    power_of_two,
)

MX_BLOCK_SIZE = 32
_E8M0_BITS = 8
_E8M0_MIN_EXPONENT = -127
_E8M0_MAX_EXPONENT = 127
#: A stored E8M0 scale is ``shared_exp + E8M0_BIAS``.
E8M0_BIAS = 127

#: Element type of each MX format, by its total element bits.
MX_ELEMENTS: dict[int, MinifloatSpec] = {4: E2M1, 6: E2M3, 8: E4M3}


def mx_shared_exponent(blocks: torch.Tensor, element: MinifloatSpec) -> torch.Tensor:
    """The OCP shared exponent of each block (last dimension), as int32 with a kept dimension."""
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    shared_exp = floor_log2(block_amax) - element.max_exponent
    return shared_exp.clamp(_E8M0_MIN_EXPONENT, _E8M0_MAX_EXPONENT)


@dataclass(frozen=True)
class MXFormat(MinifloatBlockFormat):
    """An MX format: ``MXFormat(4)`` is MXFP4 (E2M1), 6 is MXFP6 (E2M3), 8 is MXFP8 (E4M3)."""

    bits: int
    searches_scales = False  # powers of two (BlockScaledFormat.searches_scales)

    def __post_init__(self) -> None:
        if self.bits not in MX_ELEMENTS:
            raise BitplanError(f"MX formats have 4, 6 or 8 element bits, not {self.bits!r}")

    @property
    def name(self) -> str:
        return f"mxfp{self.bits}"

    @property
    def element(self) -> MinifloatSpec:
        return MX_ELEMENTS[self.bits]

    def block_size(self, length: int) -> int:
        return MX_BLOCK_SIZE

    def find_scales(self, blocks: torch.Tensor) -> BlockScales:
        # Dividing and multiplying by a power of two is exact, so only the element rounding rounds.
        return BlockScales(power_of_two(mx_shared_exponent(blocks, self.element)))

    def part_bits(self, shape: tuple[int, int]) -> dict[str, int]:
        out_features, in_features = check_weight_shape(shape)
        blocks = out_features * blocks_per_row(in_features, MX_BLOCK_SIZE)
        return {"qweight": out_features * in_features * self.bits, "scales": blocks * _E8M0_BITS}

    def pack_scales(self, scales: BlockScales) -> dict[str, torch.Tensor]:
        # floor_log2 is exact on powers of two, 2**-127 (a float32 subnormal) included.
        exponent = floor_log2(scales.scale.squeeze(-1))
        return {"scales": (exponent + E8M0_BIAS).to(torch.uint8)}

    def unpack_scales(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> BlockScales:
        exponent = parts["scales"].to(torch.int32) - E8M0_BIAS
        return BlockScales(power_of_two(exponent).unsqueeze(-1))
