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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.errors import BitplanError
from bitplan.formats.base import Format
from bitplan.formats.blocks import (
    as_float32,
    blocks_per_row,
    check_weight_shape,
    from_blocks,
    to_blocks,
)
from bitplan.formats.minifloat import (
    E2M1,
    E2M3,
    E4M3,
    MinifloatSpec,
    floor_log2,
    power_of_two,
    quantize_to_minifloat,
)

MX_BLOCK_SIZE = 32
_E8M0_BITS = 8
_E8M0_MIN_EXPONENT = -127
_E8M0_MAX_EXPONENT = 127

#: Element type of each MX format, by its total element bits.
MX_ELEMENTS: dict[int, MinifloatSpec] = {4: E2M1, 6: E2M3, 8: E4M3}


def mx_shared_exponent(blocks: torch.Tensor, element: MinifloatSpec) -> torch.Tensor:
    """The OCP shared exponent of each block (last dimension), as int32 with a kept dimension."""
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    shared_exp = floor_log2(block_amax) - element.max_exponent
    return shared_exp.clamp(_E8M0_MIN_EXPONENT, _E8M0_MAX_EXPONENT)


def fake_quantize_mx(
    x: torch.Tensor, element: MinifloatSpec, block_size: int = MX_BLOCK_SIZE
) -> torch.Tensor:
    """Quantize-dequantize float32 ``x`` in MX blocks along its last dimension."""
    length = x.shape[-1]
    blocks = to_blocks(x, block_size)
    scale = power_of_two(mx_shared_exponent(blocks, element))
    # Dividing and multiplying by a power of two is exact, so only the element rounding rounds.
    elements = quantize_to_minifloat(blocks / scale, element)
    return from_blocks(elements.mul_(scale), length)


@dataclass(frozen=True)
class MXFormat(Format):
    """An MX format: ``MXFormat(4)`` is MXFP4 (E2M1), 6 is MXFP6 (E2M3), 8 is MXFP8 (E4M3)."""

    bits: int
    quantizes_activations = True

    def __post_init__(self) -> None:
        if self.bits not in MX_ELEMENTS:
            raise BitplanError(f"MX formats have 4, 6 or 8 element bits, not {self.bits!r}")

    @property
    def name(self) -> str:
        return f"mxfp{self.bits}"

    @property
    def element(self) -> MinifloatSpec:
        return MX_ELEMENTS[self.bits]

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_mx(as_float32(weight), self.element).to(weight.dtype)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_mx(as_float32(x), self.element).to(x.dtype)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        out_features, in_features = check_weight_shape(shape)
        element_bits = out_features * in_features * self.bits
        if not include_scales:
            return element_bits
        return element_bits + out_features * blocks_per_row(in_features, MX_BLOCK_SIZE) * _E8M0_BITS
