"""Integer formats: weight-only INT2/3/4/8 with group-wise scales, and INT8 W8A8.

Conventions (those of GPTQ and auto-round's ``int_sym`` / ``int_asym``, so results compare):

* Groups of ``group_size`` consecutive weights along the input dimension share one scale;
  ``group_size=None`` means one group per output row ("per-channel").
* Symmetric, ``b`` bits: ``scale = 2 * amax / (2**b - 1)``, ``q = clamp(round(w / scale),
  -2**(b-1), 2**(b-1) - 1)``, ``w' = q * scale``. (The largest positive weight sits half a step
  past the top code and is clipped by at most half a step; no zero point is stored.)
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

SUPPORTED_INT_BITS = (2, 3, 4, 8)
_SCALE_BITS = 16  # float16 scales
_FLOAT16_MAX = torch.finfo(torch.float16).max


def _round_scale_to_float16(scale: torch.Tensor) -> torch.Tensor:
    """The float32 value of ``scale`` once stored as float16 (clipped to the finite range)."""
    return scale.clamp(max=_FLOAT16_MAX).half().float()


def fake_quantize_int(
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    float16_scales: bool = True,
) -> torch.Tensor:
    """Quantize-dequantize float32 ``x`` group-wise along its last dimension (see module doc).

    ``group_size=None`` uses one group per row of the last dimension. With
    ``float16_scales=False`` the scales stay float32 (dynamic activation scales).
    """
    length = x.shape[-1]
    groups = to_blocks(x, group_size or length)
    levels = 2**bits - 1

    if symmetric:
        scale = 2 * groups.abs().amax(dim=-1, keepdim=True) / levels
    else:
        group_min = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        group_max = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (group_max - group_min) / levels
    if float16_scales:
        scale = _round_scale_to_float16(scale)
    # Dividing by 1 where the scale is 0 keeps NaN out; those groups dequantize to 0 * q = 0.
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))

    # (In-place steps below only touch temporaries created here, never the input.)
    q = torch.div(groups, divisor).round_()
    if symmetric:
        q.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
        zero_point = torch.round(-group_min / divisor).clamp_(0, levels)
        q.add_(zero_point).clamp_(0, levels).sub_(zero_point)
    return from_blocks(q.mul_(scale), length)


def quantize_int_codes(
    x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The integer codes and float16 scales (and zero points) that :func:`fake_quantize_int`
    dequantizes, for a packed checkpoint: the same computation, stopped before ``q * scale``.

    Returns ``(codes, scale, zero_point)``: ``codes`` shaped like ``x`` (int16; signed in
    ``[-2**(b-1), 2**(b-1) - 1]`` if symmetric, else unsigned in ``[0, 2**b - 1]``), ``scale``
    float32 of shape ``(..., groups)`` holding float16 values, ``zero_point`` int16 of the same
    shape (``None`` if symmetric). ``(codes - zero_point) * scale`` group-wise, in float32, equals
    ``fake_quantize_int(x, bits, group_size, symmetric)`` exactly (the tests check it).
    """
    length = x.shape[-1]
    groups = to_blocks(x, group_size or length)
    levels = 2**bits - 1
    if symmetric:
        scale = 2 * groups.abs().amax(dim=-1, keepdim=True) / levels
    else:
        group_min = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        group_max = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (group_max - group_min) / levels
    scale = _round_scale_to_float16(scale)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.div(groups, divisor).round_()
    zero_point = None
    if symmetric:
        q.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
        zero_point = torch.round(-group_min / divisor).clamp_(0, levels)
        q.add_(zero_point).clamp_(0, levels)
        zero_point = zero_point.squeeze(-1).to(torch.int16)
    codes = from_blocks(q, length).to(torch.int16)
    return codes, scale.squeeze(-1), zero_point


@dataclass(frozen=True)
class IntFormat(Format):
    """Integer weight-only format; activations stay in high precision.

    ``IntFormat(4, 128)`` is ``w4g128`` (auto-round's W4A16); ``IntFormat(4, None)`` is ``w4``,
    one scale per output row; ``symmetric=False`` adds a zero point per group (``_asym``).
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = True

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

    @property
    def name(self) -> str:
        group = "" if self.group_size is None else f"g{self.group_size}"
        suffix = "" if self.symmetric else "_asym"
        return f"w{self.bits}{group}{suffix}"

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        result = fake_quantize_int(as_float32(weight), self.bits, self.group_size, self.symmetric)
        return result.to(weight.dtype)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        out_features, in_features = check_weight_shape(shape)
        element_bits = out_features * in_features * self.bits
        if not include_scales:
            return element_bits
        groups = out_features * blocks_per_row(in_features, self.group_size or in_features)
        bits_per_group = _SCALE_BITS + (0 if self.symmetric else self.bits)
        return element_bits + groups * bits_per_group


@dataclass(frozen=True)
class Int8W8A8Format(Format):
    """INT8 weights and activations (auto-round's INT8 W8A8 preset).

    Weights: symmetric int8, one float16 scale per output row (as ``w8``). Activations: symmetric
    int8, quantized dynamically with one float32 scale per token (per row of the last dimension),
    computed from that token's own absolute maximum at run time.
    """

    name = "int8"
    quantizes_activations = True

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        result = fake_quantize_int(as_float32(weight), 8, None, symmetric=True)
        return result.to(weight.dtype)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        result = fake_quantize_int(as_float32(x), 8, None, symmetric=True, float16_scales=False)
        return result.to(x.dtype)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        return IntFormat(8, None).weight_bits(shape, include_scales)
