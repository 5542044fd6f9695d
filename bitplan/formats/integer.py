"""Integer formats: weight-only INT2/3/4/8 with group-wise scales, and INT8 W8A8.

Conventions (those of GPTQ and auto-round's ``int_sym_gptq`` / ``int_asym``; ``_fr`` is
auto-round's ``int_sym`` and llama.cpp's ``Q4_0``, so results compare):

* Groups of ``group_size`` consecutive weights along the input dimension share one scale;
  ``group_size=None`` means one group per output row ("per-channel").
* Symmetric, ``b`` bits: ``scale = 2 * amax / (2**b - 1)``, ``q = clamp(round(w / scale),
  -2**(b-1), 2**(b-1) - 1)``, ``w' = q * scale``. (The largest positive weight sits half a step
  past the top code and is clipped by at most half a step; no zero point is stored.)
* Symmetric full range (``_fr``), ``b`` bits: the group's weight of largest magnitude ``m``
  (the positive one on a tie) lands exactly on the extra negative code:
  ``scale = -m / 2**(b-1)``, signed, so a group whose extreme is positive gets a negative scale
  and the grid ``-2**(b-1) .. 2**(b-1) - 1`` mirrored. All ``2**b`` codes are used and the step
  is ``amax / 2**(b-1)``: at 2 bits the levels are (-1, -1/2, 0, 1/2) x amax against the
  GPTQ rule's (-4/3, -2/3, 0, 2/3) x amax, one of which no weight reaches.
* Asymmetric, ``b`` bits: the range ``[min(w, 0), max(w, 0)]`` always contains 0, so 0 is exact
  and the zero point fits in ``b`` unsigned bits. ``scale = (max - min) / (2**b - 1)``,
  ``zp = clamp(round(-min / scale), 0, 2**b - 1)``, ``q = clamp(round(w / scale) + zp, 0,
  2**b - 1)``, ``w' = (q - zp) * scale``.
* Scales are stored as float16, so the scale is rounded to float16 (and clipped to its largest
  finite value) before it is used: what we compute equals what a packed checkpoint holds.
  A group whose scale is 0 (all zeros, or too small for float16) dequantizes to zeros.
* Rounding is round-half-to-even (``torch.round``).

Ragged last group: when ``in_features`` is not a multiple of ``group_size`` (SmolLM2's 576 with
group 128 is 4 x 128 + 64), the last group of each row is shorter and gets its own scale (and
zero point). Bits are counted with ``ceil(in_features / group_size)`` groups per row.

Bits of a ``(out, in)`` weight: ``out * in * b`` element bits, plus per group 16 bits of scale
and, if asymmetric, ``b`` bits of zero point.

Stored (``storage.py``): ``qweight`` the codes bit-packed, offset binary ``q + 2**(b-1)`` if
symmetric; ``scales`` float16 ``(out, groups)``; ``zeros`` the zero points bit-packed.

The rule is written once, as :func:`find_int_scales` (a group's scale and zero point) and
:func:`round_int` (round values with given scales), the block-scaled core's two steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitplan.errors import BitplanError
from bitplan.formats.base import Format
from bitplan.formats.block_scaled import BlockScaledFormat, BlockScales, nonzero_or_one
from bitplan.formats.blocks import as_float32, blocks_per_row, check_weight_shape
from bitplan.formats.packing import pack_bits, unpack_bits

SUPPORTED_INT_BITS = (2, 3, 4, 8)
_SCALE_BITS = 16  # float16 scales
_FLOAT16_MAX = torch.finfo(torch.float16).max


def _round_scale_to_float16(scale: torch.Tensor) -> torch.Tensor:
    """The float32 value of ``scale`` once stored as float16 (clipped to the finite range)."""
    return scale.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).half().float()


def find_int_scales(
    blocks: torch.Tensor,
    bits: int,
    symmetric: bool,
    float16_scales: bool = True,
    full_range: bool = False,
) -> BlockScales:
    """The scale (and, if asymmetric, zero point) of each group of float32 ``blocks``
    ``(..., groups, group_size)`` (see the module doc); ``full_range``: the signed scale of
    the symmetric full-range rule.

    With ``float16_scales=False`` the scales stay float32 (dynamic activation scales).
    """
    levels = 2**bits - 1
    low = blocks.amin(dim=-1, keepdim=True).clamp(max=0)
    high = blocks.amax(dim=-1, keepdim=True).clamp(min=0)
    if symmetric and full_range:
        extreme = torch.where(-low > high, low, high)
        scale = -extreme / 2 ** (bits - 1)
    elif symmetric:
        scale = 2 * torch.maximum(-low, high) / levels
    else:
        scale = (high - low) / levels
    if float16_scales:
        scale = _round_scale_to_float16(scale)
    if symmetric:
        return BlockScales(scale)
    zero_point = torch.round(-low / nonzero_or_one(scale)).clamp_(0, levels)
    return BlockScales(scale, zero_point)


def round_int(x: torch.Tensor, scales: BlockScales, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes of float32 ``x`` with given ``scales``, as float32: signed in
    ``[-2**(b-1), 2**(b-1) - 1]`` if symmetric, else unsigned in ``[0, 2**b - 1]`` with the zero
    point added. ``scales.dequantize`` of the codes is the quantized value."""
    # (In-place steps only touch the new tensor made by the division, never the input.)
    q = torch.div(x, scales.divisor()).round_()
    if symmetric:
        return q.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.add_(scales.zero_point).clamp_(0, 2**bits - 1)


class IntegerWeights(BlockScaledFormat):
    """The integer rule for a format with ``bits``, ``group_size`` and ``symmetric``: the base
    of :class:`IntFormat` and :class:`Int8W8A8Format` (whose weights are ``w8``)."""

    bits: int
    group_size: int | None
    symmetric: bool
    full_range: bool = False

    def block_size(self, length: int) -> int:
        return self.group_size or length

    def even_group_size(self, in_features: int) -> int | None:
        """The group size of a layout whose groups all have one size (what compressed-tensors
        and vLLM need), for a row of ``in_features``: the format's own when it divides the row,
        else the largest size that divides both (the short last group then shares its scale over
        several stored groups); None when one group covers the row."""
        if self.group_size is None or self.group_size >= in_features:
            return None
        return math.gcd(in_features, self.group_size)

    def find_scales(self, blocks: torch.Tensor) -> BlockScales:
        return find_int_scales(blocks, self.bits, self.symmetric, full_range=self.full_range)

    def round(self, x: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        return round_int(x, scales, self.bits, self.symmetric)

    def part_bits(self, shape: tuple[int, int]) -> dict[str, int]:
        out_features, in_features = check_weight_shape(shape)
        groups = out_features * blocks_per_row(in_features, self.block_size(in_features))
        parts = {"qweight": out_features * in_features * self.bits, "scales": groups * _SCALE_BITS}
        if not self.symmetric:
            parts["zeros"] = groups * self.bits
        return parts

    @property
    def element_bits(self) -> int:
        return self.bits

    def _code_offset(self) -> int:
        # Symmetric codes are stored offset binary (unsigned); asymmetric ones already are.
        return 2 ** (self.bits - 1) if self.symmetric else 0

    def element_codes(self, elements: torch.Tensor) -> torch.Tensor:
        return elements + self._code_offset()

    def code_elements(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() - self._code_offset()

    def pack_scales(self, scales: BlockScales) -> dict[str, torch.Tensor]:
        parts = {"scales": scales.scale.squeeze(-1).half()}
        if scales.zero_point is not None:
            parts["zeros"] = pack_bits(scales.zero_point.squeeze(-1), self.bits)
        return parts

    def unpack_scales(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> BlockScales:
        scale = parts["scales"].float().unsqueeze(-1)
        if self.symmetric:
            return BlockScales(scale)
        out_features, groups = shape[0], scale.shape[-2]
        zeros = unpack_bits(parts["zeros"], self.bits, out_features * groups)
        return BlockScales(scale, zeros.view(out_features, groups, 1).float())


# Rows longer than this are unheard of; a larger group is a typo, and would pad every row to it.
MAX_GROUP_SIZE = 1 << 20


@dataclass(frozen=True)
class IntFormat(IntegerWeights):
    """Integer weight-only format; activations stay in high precision.

    ``IntFormat(4, 128)`` is ``w4g128``; ``IntFormat(4, None)`` is ``w4``,
    one scale per output row; ``symmetric=False`` adds a zero point per group (``_asym``);
    ``full_range=True`` is the symmetric full-range rule (``_fr``, auto-round's ``int_sym``).
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = True
    full_range: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_INT_BITS:
            raise BitplanError(
                f"integer formats support {', '.join(map(str, SUPPORTED_INT_BITS))} bits, "
                f"not {self.bits}"
            )
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise BitplanError(
                f"group size must be a positive integer (or None for per-channel), "
                f"not {self.group_size!r}"
            )
        if self.group_size is not None and self.group_size > MAX_GROUP_SIZE:
            raise BitplanError(
                f"group size {self.group_size} is larger than any layer's rows "
                f"(at most {MAX_GROUP_SIZE}); for one scale per row write w{self.bits}"
            )
        if self.full_range and not self.symmetric:
            raise BitplanError("the full-range rule (_fr) is symmetric; it has no _asym form")

    @property
    def name(self) -> str:
        group = "" if self.group_size is None else f"g{self.group_size}"
        suffix = "_fr" if self.full_range else "" if self.symmetric else "_asym"
        return f"w{self.bits}{group}{suffix}"


@dataclass(frozen=True)
class Int8W8A8Format(IntegerWeights):
    """INT8 weights and activations (auto-round's INT8 W8A8 preset).

    Weights: symmetric int8, one float16 scale per output row (as ``w8``). Activations: symmetric
    int8, quantized dynamically with one float32 scale per token (per row of the last dimension),
    computed from that token's own absolute maximum at run time.
    """

    name = "int8"
    quantizes_activations = True
    bits = 8
    group_size = None
    symmetric = True

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quantize(as_float32(x), _float32_scales).to(x.dtype)


def _float32_scales(blocks: torch.Tensor) -> BlockScales:
    """int8 activation scales: the weights' rule with float32 scales (nothing stores them)."""
    return find_int_scales(blocks, 8, symmetric=True, float16_scales=False)


def as_int_format(fmt: Format) -> IntFormat | None:
    """The integer weight format of ``fmt`` (``int8`` stores its weights as ``w8``), or None."""
    if isinstance(fmt, IntFormat):
        return fmt
    if isinstance(fmt, Int8W8A8Format):
        return IntFormat(8, None, symmetric=True)
    return None
