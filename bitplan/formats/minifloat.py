"""Minifloat element grids (E2M1, E2M3, E4M3) and round-to-nearest-even onto them.

A minifloat with ``e`` exponent bits and ``m`` mantissa bits has exponent bias ``2**(e-1) - 1``.
Its smallest normal exponent is ``1 - bias``; below it the grid keeps that binade's spacing
(subnormals), down to zero. Within the binade ``[2**k, 2**(k+1))`` the grid spacing is
``2**(k - m)``. So to round ``x`` we find its binade from the float32 exponent bits, divide by
the spacing, round to the nearest integer (ties to even, which is what an even mantissa means on
this grid) and multiply back. Every step is exact in float32: only the rounding rounds.

Values beyond the largest normal value saturate to it (``±max_normal``): MX, NVFP4 and FP8 all
clip rather than overflow to infinity. NaN stays NaN; ``±inf`` saturates like any large value.

The three element types used here:

======  ====  =========  ==========  ====================================================
name    bias  max        emax        non-negative values
======  ====  =========  ==========  ====================================================
E2M1    1     6.0        2           0, 0.5, 1, 1.5, 2, 3, 4, 6
E2M3    1     7.5        2           0, 0.125, ..., 7.5 (spacing 0.125 below 2, 0.25, 0.5)
E4M3    7     448        8           OCP E4M3FN: subnormals down to 2**-9; no infinities
======  ====  =========  ==========  ====================================================

E4M3 here is the "FN" variant (``torch.float8_e4m3fn``): the all-ones exponent still holds
normal numbers up to 448, only ``S.1111.111`` is NaN. The tests check our rounding against
``torch``'s own float8 cast bit for bit.

Stored element codes are sign-magnitude: the magnitude's index on the element's grid of
non-negative values (which is the order of its exponent-mantissa bit pattern), with the sign in
the top bit. For E2M1 that is the OCP FP4 encoding, for E2M3 the OCP FP6 one, and for E4M3 the
bit pattern of ``torch.float8_e4m3fn``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from bitplan.errors import BitplanError

_FLOAT32_EXPONENT_BIAS = 127
_FLOAT32_MANTISSA_BITS = 23
_FLOAT32_EXPONENT_MASK = 0x7F800000


@dataclass(frozen=True)
class MinifloatSpec:
    """A sign-exponent-mantissa element type with subnormals, saturating at ``max_normal``."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max_normal: float

    @property
    def bits(self) -> int:
        """Storage bits of one element (sign + exponent + mantissa)."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_normal_exponent(self) -> int:
        """log2 of the smallest normal value; subnormals share this binade's spacing."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """log2 of the largest power of two on the grid (``emax`` in the OCP MX spec)."""
        return math.floor(math.log2(self.max_normal))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Round a float32 tensor onto this grid; see :func:`quantize_to_minifloat`."""
        return quantize_to_minifloat(x, self)

    def grid(self) -> torch.Tensor:
        """All non-negative representable values, ascending (for tests and documentation)."""
        subnormal_step = 2.0 ** (self.min_normal_exponent - self.mantissa_bits)
        values = {0.0}
        # Subnormals, then each normal binade up to max_normal.
        for k in range(1, 2**self.mantissa_bits):
            values.add(k * subnormal_step)
        for exponent in range(self.min_normal_exponent, self.max_exponent + 1):
            step = 2.0 ** (exponent - self.mantissa_bits)
            for k in range(2**self.mantissa_bits):
                value = 2.0**exponent + k * step
                if value <= self.max_normal:
                    values.add(value)
        return torch.tensor(sorted(values), dtype=torch.float32)


E2M1 = MinifloatSpec("e2m1", exponent_bits=2, mantissa_bits=1, max_normal=6.0)
E2M3 = MinifloatSpec("e2m3", exponent_bits=2, mantissa_bits=3, max_normal=7.5)
E4M3 = MinifloatSpec("e4m3", exponent_bits=4, mantissa_bits=3, max_normal=448.0)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(|x|))`` of a float32 tensor, as int32, read from the exponent bits.

    Zero and float32 subnormals (``|x| < 2**-126``) give -127; callers clamp from below anyway.
    This is exact where ``torch.log2`` may round up just below a power of two, and much faster
    than ``torch.frexp``.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"floor_log2 expects float32, got {x.dtype}")
    biased_exponent = (x.view(torch.int32) >> _FLOAT32_MANTISSA_BITS) & 0xFF
    return biased_exponent - _FLOAT32_EXPONENT_BIAS


def power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**exponent`` for an integer tensor with values in [-149, 127].

    Built from bits so that no ``exp2`` rounding can creep in; -149..-127 give subnormals
    (MX needs 2**-127).
    """
    exponent = exponent.to(torch.int32)
    normal_bits = (exponent + _FLOAT32_EXPONENT_BIAS).clamp(min=1) << _FLOAT32_MANTISSA_BITS
    # A subnormal 2**e has the single mantissa bit e + 149 set and a zero exponent field.
    subnormal_bits = torch.ones_like(exponent) << (exponent + 149).clamp(0, 22)
    bits = torch.where(exponent >= -126, normal_bits, subnormal_bits)
    return bits.view(torch.float32)


def quantize_to_minifloat(x: torch.Tensor, spec: MinifloatSpec) -> torch.Tensor:
    """Round float32 ``x`` to the nearest value of ``spec``'s grid, ties to even, saturating.

    Returns a new float32 tensor of the same shape; ``x`` is not modified.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_to_minifloat expects float32, got {x.dtype}")
    x = x.contiguous()
    # Masking a float32 down to its exponent field leaves exactly 2**floor(log2|x|): the binade.
    # Clamp it below to the smallest normal binade (subnormals share its spacing) and above to
    # one binade past the largest (anything there saturates, so its exact binade is irrelevant).
    binade_bits = x.view(torch.int32) & _FLOAT32_EXPONENT_MASK
    binade_bits.clamp_(
        (spec.min_normal_exponent + _FLOAT32_EXPONENT_BIAS) << _FLOAT32_MANTISSA_BITS,
        (spec.max_exponent + 1 + _FLOAT32_EXPONENT_BIAS) << _FLOAT32_MANTISSA_BITS,
    )
    step = binade_bits.view(torch.float32).mul_(2.0**-spec.mantissa_bits)  # grid spacing
    # torch.round rounds half to even: on this grid that is the even mantissa. In-place ops on
    # our own temporaries keep this at a few passes over memory.
    rounded = torch.div(x, step).round_().mul_(step)
    return rounded.clamp_(-spec.max_normal, spec.max_normal)


# --------------------------------------------------------------------------- stored codes


@cache
def _grid(spec: MinifloatSpec) -> torch.Tensor:
    return spec.grid().to(torch.float32)


def minifloat_to_codes(values: torch.Tensor, spec: MinifloatSpec) -> torch.Tensor:
    """Sign-magnitude codes (int64) of float32 ``values`` that lie on ``spec``'s grid.

    Raises :class:`BitplanError` if a value is not on the grid (a bug upstream, never rounding).
    """
    grid = _grid(spec)
    magnitude = values.abs()
    index = torch.searchsorted(grid, magnitude).clamp_(max=grid.numel() - 1)
    if not torch.equal(grid[index], magnitude):
        raise BitplanError(f"values are not on the {spec.name} grid; cannot encode them")
    sign = torch.signbit(values).to(torch.int64) << (spec.bits - 1)
    return index | sign


def codes_to_minifloat(codes: torch.Tensor, spec: MinifloatSpec) -> torch.Tensor:
    """Float32 values of sign-magnitude ``codes`` (inverse of :func:`minifloat_to_codes`)."""
    grid = _grid(spec)
    codes = codes.to(torch.int64)
    magnitude_mask = 2 ** (spec.bits - 1) - 1
    index = codes & magnitude_mask
    if index.numel() and int(index.max()) >= grid.numel():
        raise BitplanError(f"invalid {spec.name} code (NaN or out of range) in a packed tensor")
    magnitude = grid[index]
    negative = (codes >> (spec.bits - 1)) & 1
    return torch.where(negative.bool(), -magnitude, magnitude)
