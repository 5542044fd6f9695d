"""GGUF (llama.cpp) tensor types as bitplan formats: q2_k ... q6_k, q8_0, q4_0, iq4_xs ...

A GGUF file may hold a different type for every tensor, so each llama.cpp tensor type is a
format a plan can choose. The bytes are the ones ``llama-quantize`` writes, by either of two
quantizers that the tests check against each other and against llama.cpp byte for byte:

* llama.cpp's own ``ggml_quantize_chunk`` (``ggml_quantizer.py``, through ctypes into the
  ``libggml-base`` that llama-cpp-python ships), whenever llama-cpp-python is installed: it is
  2-12x faster than the port, and the only quantizer of the i-quants (IQ4_NL ... IQ1_S);
* bitplan's numpy port of llama.cpp's reference C code (``ggml-quants.c``) for the types in
  :data:`PORTED_TYPES` (Q2_K ... Q6_K, Q4_0 ... Q8_0, MXFP4, BF16), operation for operation,
  in float32 with the same order of summation; it serves installs without llama-cpp-python.

Dequantization is the ``gguf`` package's (equal to ggml's own, also tested).

* Without an importance matrix each type uses llama.cpp's ``quantize_row_*_ref``; with one
  (``importance``: the mean square of each input column over calibration tokens, llama.cpp's
  imatrix) it uses the weighted search of ``quantize_row_*_impl``, as ``llama-quantize
  --imatrix`` does. Q8_0, MXFP4, BF16 and F16 ignore it, as llama.cpp does. IQ3_XXS, IQ2_S,
  IQ2_XS, IQ2_XXS, IQ1_M and IQ1_S are refused without one, as llama-quantize refuses them.
* Blocks run along a row (the input dimension): 256 weights for the k-quants and most
  i-quants, 32 for the others. A row whose length is not a multiple of the block size cannot
  hold that type, so a format then stands for **llama.cpp's fallback type**, exactly as
  ``llama-quantize`` decides it (``tensor_type_fallback`` in ``llama-quant.cpp``): Q2_K and
  Q3_K become Q4_0, Q4_K becomes Q5_0, Q5_K becomes Q5_1, Q6_K becomes Q8_0, the 256-block
  i-quants become IQ4_NL, and a 32-block type on a row that 32 does not divide becomes F16.
  :meth:`GGUFFormat.tensor_type` says which type a shape gets; bits, quantization and export
  all use that type, so the accounting stays exact. SmolLM2-135M (rows of 576 = 2.25 x 256)
  can only hold k-quants in ``down_proj`` (rows of 1536).

Bits are what the file stores: ``rows x row_length / block x bytes_per_block x 8``, e.g. Q4_K
4.5 bits per weight, Q6_K 6.5625, Q8_0 8.5, IQ2_XS 2.3125 (``gguf.GGML_QUANT_SIZES``).

The port's exactness assumes llama.cpp's quantizers are compiled without floating-point
contraction (no fused multiply-add), which holds for x86-64 builds: ``ggml-quants.c`` is part
of ggml-base, which is built for the baseline instruction set. An ARM build contracts
``a*b + c`` and may pick different codes in rare near-ties (ggml itself is then the truth, and
used). docs/GGUF.md lists the checks and the remaining caveats.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from bitplan.errors import BitplanError
from bitplan.formats.base import Format
from bitplan.formats.blocks import check_float_tensor, check_weight_shape
from bitplan.formats.ggml_quantizer import ggml_available, ggml_quantize_rows
from bitplan.formats.gguf_activations import round_activations

F32 = np.float32
QK_K = 256
_GROUP_MAX_EPS = F32(1e-15)


@dataclass(frozen=True)
class GGMLType:
    """One llama.cpp tensor type: block size, bytes per block, and its fallback."""

    name: str  # llama.cpp's spelling, e.g. "Q4_K"
    element_bits: int  # bits of each weight's code, scales left out (nominal for i-quants)
    fallback: str | None  # llama-quantize's type when a row does not divide into blocks
    #: How llama.cpp's CPU matmul rounds the input for this type (its ``vec_dot_type``, a key of
    #: ``gguf_activations.ROUNDINGS``).
    activations: str
    #: llama-quantize refuses this type without an imatrix (``tensor_requires_imatrix``).
    needs_imatrix: bool = False

    @property
    def ggml(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def fits(self, row_length: int) -> bool:
        return row_length % self.block_size == 0


#: The types bitplan can quantize to, by llama.cpp's name.
GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("Q2_K", 2, "Q4_0", "Q8_K"),
        GGMLType("Q3_K", 3, "Q4_0", "Q8_K"),
        GGMLType("Q4_K", 4, "Q5_0", "Q8_K"),
        GGMLType("Q5_K", 5, "Q5_1", "Q8_K"),
        GGMLType("Q6_K", 6, "Q8_0", "Q8_K"),
        GGMLType("Q4_0", 4, "F16", "Q8_0"),
        GGMLType("Q4_1", 4, "F16", "Q8_0"),  # Q8_1 for Q4_1 and Q5_1: Q8_0's values
        GGMLType("Q5_0", 5, "F16", "Q8_0"),
        GGMLType("Q5_1", 5, "F16", "Q8_0"),
        GGMLType("Q8_0", 8, "F16", "Q8_0"),
        GGMLType("MXFP4", 4, "F16", "Q8_0"),
        # i-quants: quantized by ggml itself (ggml_quantizer.py), never by the numpy port.
        GGMLType("IQ4_NL", 4, "F16", "Q8_0"),
        GGMLType("IQ4_XS", 4, "IQ4_NL", "Q8_K"),
        GGMLType("IQ3_S", 3, "IQ4_NL", "Q8_K"),
        GGMLType("IQ3_XXS", 3, "IQ4_NL", "Q8_K", needs_imatrix=True),
        GGMLType("IQ2_S", 2, "IQ4_NL", "Q8_K", needs_imatrix=True),
        GGMLType("IQ2_XS", 2, "IQ4_NL", "Q8_K", needs_imatrix=True),
        GGMLType("IQ2_XXS", 2, "IQ4_NL", "Q8_K", needs_imatrix=True),
        GGMLType("IQ1_M", 1, "IQ4_NL", "Q8_K", needs_imatrix=True),
        GGMLType("IQ1_S", 1, "IQ4_NL", "Q8_K", needs_imatrix=True),
        GGMLType("BF16", 16, None, "BF16"),
        GGMLType("F16", 16, None, "F16"),
        GGMLType("F32", 32, None, "F32"),
    )
}


def resolve_type(type_name: str, row_length: int) -> GGMLType:
    """The type llama.cpp stores a row of ``row_length`` weights in when asked for ``type_name``."""
    ggml_type = GGML_TYPES[type_name]
    while not ggml_type.fits(row_length):
        if ggml_type.fallback is None:
            raise BitplanError(f"no GGUF type can hold rows of {row_length} weights")
        ggml_type = GGML_TYPES[ggml_type.fallback]
    return ggml_type


# ---------------------------------------------------------------------------------------------
# Float32 helpers that reproduce the C code's arithmetic exactly.
#
# Arrays of groups are laid out (elements, groups): element index first, so that the C loops
# over a group's elements become loops over contiguous rows, with every group at once.


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 left to right in float32, as ``for (i...) s += a[i]`` does in C."""
    out = np.zeros(a.shape[1:], F32)
    for row in a:
        out += row
    return out


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` (adding 1.5 * 2**23 rounds to nearest, ties to even), as float32.

    Equal to it wherever it is defined (|v| < 2**22, which llama.cpp asserts in debug builds).
    """
    return np.rint(v.astype(F32, copy=False))


def _as_u8(v: np.ndarray) -> np.ndarray:
    """Storing an int into ``uint8_t`` wraps modulo 256."""
    return np.mod(v, F32(256.0)).astype(F32)


def _fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even), kept as float16."""
    return v.astype(np.float16)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each group (column): the largest |x| and the signed x where it first occurs."""
    index = np.abs(x).argmax(axis=0)
    value = np.take_along_axis(x, index[None, :], axis=0)[0]
    value = np.where(value == 0, F32(0), value)  # C starts from +0.0 and keeps it
    return np.abs(value), value


def _err(diff: np.ndarray, use_mad: bool) -> np.ndarray:
    return np.abs(diff) if use_mad else diff * diff


def _make_qkx(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (same code when weights are given): an
    affine (scale, min) search for each group. Returns scale, the_min (= -min) and codes."""
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = _seqsum(weights)
    sum_x = _seqsum(weights * x)
    mn = np.where(mn > 0, F32(0), mn)
    flat = mx <= mn
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    codes = _levels(x, mn, iscale, nmax)
    best = _weighted_error(x, weights, codes, scale, mn, use_mad)
    for step in range(nstep + 1):
        # The C loop uses the current min, which moves when a step improves the error.
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
        aux = _levels(x, mn, iscale, nmax)
        wl = weights * aux
        sum_l = _seqsum(wl)
        sum_xl = _seqsum(wl * x)
        wl *= aux
        sum_l2 = _seqsum(wl)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        error = _weighted_error(x, weights, aux, this_scale, this_min, use_mad)
        better = (det > 0) & (error < best) & ~flat
        if better.any():
            np.copyto(codes, aux, where=better)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    codes[:, flat] = 0
    scale = np.where(flat, F32(0), scale)
    return scale, -mn, codes


def _levels(x: np.ndarray, mn: np.ndarray, iscale: np.ndarray, nmax: int) -> np.ndarray:
    """``clamp(nearest_int(iscale * (x - min)), 0, nmax)``."""
    out = x - mn
    out *= iscale
    np.rint(out, out=out)
    return np.clip(out, 0, nmax, out=out)


def _weighted_error(
    x: np.ndarray,
    weights: np.ndarray,
    codes: np.ndarray,
    scale: np.ndarray,
    mn: np.ndarray,
    use_mad: bool,
) -> np.ndarray:
    """``sum(w * err(scale * L + min - x))``, err = |d| or d², summed in C order."""
    diff = codes * scale
    diff += mn
    diff -= x
    if use_mad:
        np.abs(diff, out=diff)
    else:
        diff *= diff
    diff *= weights
    return _seqsum(diff)


def _make_qp(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants``: codes 0..nmax for non-negative values (a block's sub-scales or
    sub-mins) and their weighted least-squares scale. Returns scale and uint8 codes."""
    mx = np.maximum(F32(0), x.max(axis=0))
    zero = mx < _GROUP_MAX_EPS
    iscale = F32(nmax) / mx
    codes = _as_u8(_nearest_int(iscale * x))
    scale = F32(1) / iscale
    diff = x - scale * codes
    best = _seqsum(weights * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_step = (F32(0.1) * F32(step) + F32(nmax)) / mx
        scale_step = F32(1) / iscale_step
        trial = np.minimum(F32(nmax), _nearest_int(iscale_step * x))
        diff = x - scale_step * trial
        error = _seqsum(weights * diff * diff)
        better = error < best
        best = np.where(better, error, best)
        iscale = np.where(better, iscale_step, iscale)
    codes = _as_u8(np.minimum(F32(nmax), _nearest_int(iscale * x)))
    sumlx = _seqsum(weights * x * codes)
    suml2 = _seqsum(weights * codes * codes)
    for _ in range(5):  # a pass that changes nothing leaves the state as it was, so no early exit
        for i in range(x.shape[0]):
            w, xi, li = weights[i], x[i], codes[i]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            try_it = (slx > 0) & (sl2 > 0)
            new = np.minimum(F32(nmax), _nearest_int(xi * sl2 / slx))
            try_it &= new != li
            slx = slx + w * xi * new
            sl2 = sl2 + w * new * new
            take = try_it & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[i] = np.where(take, _as_u8(new), li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    result = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), result), np.where(zero, F32(0), codes)


def _make_qx(x: np.ndarray, nmax: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants`` with rmse_type 1: symmetric codes -nmax..nmax-1 (returned + nmax)
    and a weighted least-squares scale, trying 18 scales around ``-nmax / max``."""
    amax, mx = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    w = x * x if weights is None else weights
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        return levels, _seqsum(wx * levels), _seqsum(w * levels * levels)

    levels, sumlx, suml2 = trial(F32(-nmax) / mx)
    codes = levels + F32(nmax)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in (-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        levels, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = np.where(better, levels + F32(nmax), codes)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), codes)


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants`` with do_rmse: codes -nmax..nmax-1 (returned + nmax) refined one at a
    time with x² weights (Q3_K without an importance matrix)."""
    amax, mx = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    codes = np.clip(_nearest_int(F32(-nmax) / mx * x), -nmax, nmax - 1)
    w = x * x
    sumlx = _seqsum(w * x * codes)
    suml2 = _seqsum(w * codes * codes)
    for _ in range(5):
        for i in range(x.shape[0]):
            wi, xi, li = w[i], x[i], codes[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
            try_it = (slx > 0) & (new != li)
            slx = slx + wi * xi * new
            sl2 = sl2 + wi * new * new
            take = try_it & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[i] = np.where(take, new, li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), codes + F32(nmax))


# ---------------------------------------------------------------------------------------------
# Packing codes into llama.cpp's block layouts (little-endian, as ggml-common.h declares them).


def _u8(v: np.ndarray) -> np.ndarray:
    return v.astype(np.int64).astype(np.uint8)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """(B,) float16 -> (B, 2) bytes."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _pack_2bit(codes: np.ndarray) -> np.ndarray:
    """(B, 256) codes 0..3 -> (B, 64): byte l of each 128-half holds elements l, l+32, l+64, l+96."""
    q = _u8(codes).reshape(-1, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12 bytes of Q4_K / Q5_K (uint8 semantics)."""
    ls = ls.astype(np.int64)
    lm = lm.astype(np.int64)
    out = np.zeros((ls.shape[0], 12), np.int64)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return (out & 0xFF).astype(np.uint8)


def _unpack_k4_scales(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for all eight sub-blocks, as float32."""
    q = q.astype(np.int64)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(F32), mn.astype(F32)


def _pack_q3_scales(levels: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit values (0..63) -> the 12 scale bytes of Q3_K."""
    levels = levels.astype(np.int64)
    low, high = levels & 0xF, levels >> 4
    out = np.zeros((levels.shape[0], 12), np.int64)
    out[:, 0:8] = low[:, 0:8] | (low[:, 8:16] << 4)
    for j in range(16):
        out[:, 8 + j % 4] |= high[:, j] << (2 * (j // 4))
    return (out & 0xFF).astype(np.uint8)


def _unpack_q3_scales(q: np.ndarray) -> np.ndarray:
    """The sixteen signed scales (-32..31) of Q3_K's 12 bytes, as float32."""
    q = q.astype(np.int64)
    low = np.concatenate([q[:, 0:8] & 0xF, q[:, 0:8] >> 4], axis=1)
    high = np.stack([(q[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1)
    return ((low | (high << 4)) - 32).astype(F32)


def _sub_blocks(x: np.ndarray, size: int) -> np.ndarray:
    """(B, 256) -> (size, B * 256 / size): one column per sub-block, element index first."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _from_sub_blocks(a: np.ndarray, blocks: int) -> np.ndarray:
    return a.T.reshape(blocks, -1)


def _block_sigma2(x: np.ndarray, factor: int) -> np.ndarray:
    """``factor * sum(x²) / 256`` per super-block, summed in C order; (B,)."""
    return F32(factor) * _seqsum(np.ascontiguousarray((x * x).T)) / F32(QK_K)


def _importance_weights(
    x: np.ndarray, importance: np.ndarray, sigma2: np.ndarray, size: int
) -> np.ndarray:
    """``qw[l] * sqrtf(sigma2 + x[l]²)`` for every element, laid out as sub-block columns."""
    blocks = x.shape[0]
    qw = importance.reshape(blocks, -1)
    return _sub_blocks(qw * np.sqrt(sigma2[:, None] + x * x), size)


def _requantize(
    x: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, lo: int, hi: int
) -> np.ndarray:
    """The final pass of every k-quant: ``clamp(nearest_int((x + offset) / scale))`` per
    sub-block, keeping the search's codes where the stored scale is zero."""
    blocks, subs = scale.shape
    xs = x.reshape(blocks, subs, -1)
    new = np.clip(_nearest_int((xs + offset[:, :, None]) / scale[:, :, None]), lo, hi)
    keep = (scale == 0)[:, :, None]
    return np.where(keep, codes.reshape(blocks, subs, -1), new).reshape(blocks, -1)


def _quantize_q2_k(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    blocks = x.shape[0]
    xs = _sub_blocks(x, 16)
    if importance is None:  # quantize_row_q2_K_ref
        scales, mins, codes = _make_qkx(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(blocks, 16), mins.reshape(blocks, 16)
        max_scale = np.maximum(F32(0), scales.max(axis=1))
        max_min = np.maximum(F32(0), mins.max(axis=1))
        ls = _nearest_int(F32(15) / max_scale[:, None] * scales).astype(np.int64)
        lm = _nearest_int(F32(15) / max_min[:, None] * mins).astype(np.int64)
        ls = np.where(max_scale[:, None] > 0, ls & 0xFF, 0)
        lm = np.where(max_min[:, None] > 0, lm << 4, 0)
        packed = ((ls | lm) & 0xFF).astype(np.uint8)
        d = _fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
        dmin = _fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    else:  # quantize_row_q2_K_impl
        sigma2 = _block_sigma2(x, 1)
        weights = _importance_weights(x, importance, sigma2, 16)
        sw = _seqsum(weights).reshape(blocks, 16)
        scales, mins, codes = _make_qkx(xs, weights, 3, -0.9, 0.05, 36, False)
        scales, mins = scales.reshape(blocks, 16), mins.reshape(blocks, 16)
        dm, ls = _make_qp(np.ascontiguousarray(scales.T), 15, np.ascontiguousarray(sw.T))
        mm, lm = _make_qp(np.ascontiguousarray(mins.T), 15, np.ascontiguousarray(sw.T))
        packed = ((ls.T.astype(np.int64) | (lm.T.astype(np.int64) << 4)) & 0xFF).astype(np.uint8)
        d, dmin = _fp16(dm), _fp16(mm)
    sc = (packed & 0xF).astype(F32) * d.astype(F32)[:, None]
    mn = (packed >> 4).astype(F32) * dmin.astype(F32)[:, None]
    codes = _requantize(x, _from_sub_blocks(codes, blocks), sc, mn, 0, 3)
    return np.concatenate([packed, _pack_2bit(codes), _fp16_bytes(d), _fp16_bytes(dmin)], axis=1)


def _quantize_q3_k(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    blocks = x.shape[0]
    xs = _sub_blocks(x, 16)
    if importance is None:  # quantize_row_q3_K_ref
        scales, codes = _make_q3(xs, 4)
        _, max_scale = _first_absmax(np.ascontiguousarray(scales.reshape(blocks, 16).T))
        iscale = F32(-32) / max_scale
        levels = _nearest_int(iscale[:, None] * scales.reshape(blocks, 16)).astype(np.int64)
        levels = ((levels + 128) & 0xFF) - 128  # stored in an int8_t first
        levels = np.clip(levels, -32, 31) + 32
        nonzero = max_scale != 0
        packed = np.where(nonzero[:, None], _pack_q3_scales(levels), 0).astype(np.uint8)
        d = _fp16(np.where(nonzero, F32(1) / iscale, F32(0)))
    else:  # quantize_row_q3_K_impl
        sigma2 = _block_sigma2(x, 2)
        weights = _importance_weights(x, importance, sigma2, 16)
        sw = _seqsum(weights).reshape(blocks, 16)
        scales, codes = _make_qx(xs, 4, weights)
        d_block, levels = _make_qx(
            np.ascontiguousarray(scales.reshape(blocks, 16).T), 32, np.ascontiguousarray(sw.T)
        )
        packed = _pack_q3_scales(levels.T)
        d = _fp16(d_block)
    sc = _unpack_q3_scales(packed) * d.astype(F32)[:, None]
    codes = _requantize(x, _from_sub_blocks(codes, blocks) - 4, sc, np.zeros_like(sc), -4, 3) + 4
    high = _u8(codes > 3).reshape(blocks, 8, 32)  # bit j of hmask[m] is element 32*j + m
    hmask = np.zeros((blocks, 32), np.uint8)
    for j in range(8):
        hmask |= high[:, j] << j
    low = np.where(codes > 3, codes - 4, codes)
    return np.concatenate([hmask, _pack_2bit(low), packed, _fp16_bytes(d)], axis=1)


def _quantize_k4_k5(x: np.ndarray, importance: np.ndarray | None, nmax: int) -> np.ndarray:
    """Q4_K (nmax 15) and Q5_K (nmax 31): eight sub-blocks of 32 with 6-bit scales and mins."""
    blocks = x.shape[0]
    xs = _sub_blocks(x, 32)
    if importance is None:  # quantize_row_q{4,5}_K_ref
        av_x = np.sqrt(_seqsum(xs * xs) / F32(32))
        search = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, codes = _make_qkx(xs, av_x + np.abs(xs), nmax, *search, False)
        scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)
        max_scale = np.maximum(F32(0), scales.max(axis=1))
        max_min = np.maximum(F32(0), mins.max(axis=1))
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales).astype(np.int64) & 0xFF)
        lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins).astype(np.int64) & 0xFF)
        d, dmin = _fp16(max_scale / F32(63)), _fp16(max_min / F32(63))
    else:  # quantize_row_q{4,5}_K_impl
        sigma2 = _block_sigma2(x, 2)
        weights = _importance_weights(x, importance, sigma2, 32)
        sw = np.ascontiguousarray(_seqsum(weights).reshape(blocks, 8).T)
        scales, mins, codes = _make_qkx(xs, weights, nmax, -0.9, 0.05, 36, False)
        d_block, ls = _make_qp(np.ascontiguousarray(scales.reshape(blocks, 8).T), 63, sw)
        m_block, lm = _make_qp(np.ascontiguousarray(mins.reshape(blocks, 8).T), 63, sw)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # only Q5_K's impl clamps (a no-op: make_qp_quants stays below 64)
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d, dmin = _fp16(d_block), _fp16(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, mn = _unpack_k4_scales(packed)
    codes = _requantize(
        x,
        _from_sub_blocks(codes, blocks),
        sc * d.astype(F32)[:, None],
        mn * dmin.astype(F32)[:, None],
        0,
        nmax,
    )
    q = _u8(codes).reshape(blocks, 4, 2, 32)  # 64-element chunks: low nibbles, then high
    head = [_fp16_bytes(d), _fp16_bytes(dmin), packed]
    if nmax == 15:
        qs = q[:, :, 0] | (q[:, :, 1] << 4)
        return np.concatenate([*head, qs.reshape(blocks, 128)], axis=1)
    low = q & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(blocks, 128)
    hi = q >> 4  # (blocks, 4, 2, 32): chunk c, half h sets bit 2c + h of qh[l]
    qh = np.zeros((blocks, 32), np.uint8)
    for c in range(4):
        qh |= (hi[:, c, 0] << (2 * c)) | (hi[:, c, 1] << (2 * c + 1))
    return np.concatenate([*head, qh, qs], axis=1)


def _quantize_q6_k(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    blocks = x.shape[0]
    xs = _sub_blocks(x, 16)
    qw = None if importance is None else _sub_blocks(importance.reshape(blocks, -1), 16)
    scales, codes = _make_qx(xs, 32, qw)  # the impl passes the imatrix itself as weights
    scales = scales.reshape(blocks, 16)
    max_abs, max_scale = _first_absmax(np.ascontiguousarray(scales.T))
    zero = max_abs < _GROUP_MAX_EPS
    iscale = F32(-128) / max_scale
    d = _fp16(np.where(zero, F32(0), F32(1) / iscale))
    levels = np.minimum(127, _nearest_int(iscale[:, None] * scales).astype(np.int64))
    levels = ((levels + 128) & 0xFF) - 128  # int8_t
    sc = levels.astype(F32) * d.astype(F32)[:, None]
    codes = _requantize(x, _from_sub_blocks(codes, blocks) - 32, sc, np.zeros_like(sc), -32, 31)
    q = _u8(codes + 32).reshape(blocks, 2, 4, 32)  # two 128-halves of four 32-element rows
    low, high = q & 0xF, q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate(
        [ql.reshape(blocks, 128), qh.reshape(blocks, 64), _u8(levels), _fp16_bytes(d)], axis=1
    )
    out[zero] = 0  # an all-zero block is written as zeros
    return out


def _row_sigma2(rows: np.ndarray) -> np.ndarray:
    """``sum(x²) / n_per_row`` of each row, summed in C order; (rows,)."""
    return _seqsum(np.ascontiguousarray((rows * rows).T)) / F32(rows.shape[1])


def _legacy_weights(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Q4_0 .. Q5_1 with an imatrix: ``qw * sqrtf(sigma2 + x²)`` with sigma2 over the whole row,
    laid out as one column per 32-block."""
    sigma2 = _row_sigma2(rows)
    return _sub_blocks(importance[None, :] * np.sqrt(sigma2[:, None] + rows * rows), 32)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(B, 32) codes -> (B, 16) bytes: low nibble element j, high nibble element j + 16."""
    q = _u8(codes)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _pack_fifth_bits(codes: np.ndarray) -> np.ndarray:
    """(B, 32) 5-bit codes -> (B, 4) bytes of qh: bit j is bit 4 of element j (little-endian)."""
    bits = (_u8(codes) >> 4) & 1
    qh = np.zeros(codes.shape[0], np.uint32)
    for j in range(32):
        qh |= bits[:, j].astype(np.uint32) << np.uint32(j)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def _truncate(v: np.ndarray) -> np.ndarray:
    """C's float -> integer conversion (toward zero)."""
    return np.trunc(v)


def _quantize_q4_0_q5_0(rows: np.ndarray, importance: np.ndarray | None, bits: int) -> np.ndarray:
    blocks = rows.reshape(-1, 32)
    half = 1 << (bits - 1)  # 8 or 16
    if importance is None:  # quantize_row_q{4,5}_0_ref
        _, mx = _first_absmax(np.ascontiguousarray(blocks.T))
        d = mx / F32(-half)
        inv = np.where(d != 0, F32(1) / d, F32(0))
        codes = np.minimum(2 * half - 1, _truncate(blocks * inv[:, None] + F32(half + 0.5)))
    else:  # quantize_row_q{4,5}_0_impl
        scale, codes = _make_qx(_sub_blocks(rows, 32), half, _legacy_weights(rows, importance))
        d, codes = scale, codes.T
    head = [_fp16_bytes(_fp16(d))]
    if bits == 5:
        head.append(_pack_fifth_bits(codes))
    return np.concatenate([*head, _pack_nibbles(codes)], axis=1)


def _quantize_q4_1_q5_1(rows: np.ndarray, importance: np.ndarray | None, bits: int) -> np.ndarray:
    blocks = rows.reshape(-1, 32)
    nmax = (1 << bits) - 1
    if importance is None:  # quantize_row_q{4,5}_1_ref
        mn, mx = blocks.min(axis=1), blocks.max(axis=1)
        d = (mx - mn) / F32(nmax)
        inv = np.where(d != 0, F32(1) / d, F32(0))
        codes = _truncate((blocks - mn[:, None]) * inv[:, None] + F32(0.5))
        if bits == 4:
            codes = np.minimum(F32(15), codes)
        m = mn
    else:  # quantize_row_q{4,5}_1_impl
        weights = _legacy_weights(rows, importance)
        d, the_min, codes = _make_qkx(_sub_blocks(rows, 32), weights, nmax, -0.9, 0.05, 36, False)
        codes, m = codes.T, -the_min
    head = [_fp16_bytes(_fp16(d)), _fp16_bytes(_fp16(m))]
    if bits == 5:
        head.append(_pack_fifth_bits(codes))
    return np.concatenate([*head, _pack_nibbles(codes)], axis=1)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero), exactly; a + 0.5 would round up 0.49999997."""
    a = np.abs(v)
    floored = np.floor(a)
    return np.sign(v) * (floored + np.floor(F32(2) * (a - floored)))


def _quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    blocks = rows.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / F32(127)
    inv = np.where(d != 0, F32(1) / d, F32(0))
    codes = _roundf(blocks * inv[:, None]).astype(np.int8).view(np.uint8)
    return np.concatenate([_fp16_bytes(_fp16(d)), codes], axis=1)


_MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """GGML_E8M0_TO_FP32_HALF: 2**(e - 128) as float32 (the element values are doubled)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(F32)


def _quantize_mxfp4(rows: np.ndarray) -> np.ndarray:
    blocks = rows.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        # floorf(log2f(amax)): a correctly rounded float32 log2, then floor.
        log2 = np.log2(amax.astype(np.float64)).astype(F32)
    e = np.where(amax > 0, np.floor(log2) - 2 + 127, 0).astype(np.uint8)
    d = _e8m0_half(e)
    errors = np.abs(d[:, None, None] * _MXFP4_VALUES.astype(F32) - blocks[:, :, None])
    codes = errors.argmin(axis=2).astype(np.uint8)  # the first of equal errors, as in C
    qs = codes[:, :16] | (codes[:, 16:] << 4)
    return np.concatenate([e[:, None], qs], axis=1)


def _quantize_bf16(rows: np.ndarray) -> np.ndarray:
    u = rows.astype(F32).view(np.uint32).astype(np.uint64)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    h = np.where(is_nan, (u >> 16) | 64, rounded).astype(np.uint16)
    return h.astype("<u2").view(np.uint8).reshape(rows.shape[0], -1)


#: The types bitplan's numpy port quantizes (without llama-cpp-python). The i-quants are
#: quantized by ggml only.
PORTED_TYPES = frozenset(
    ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4")
    + ("BF16", "F16", "F32")
)


def _checked(
    rows: np.ndarray, type_name: str, importance: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``rows`` and ``importance`` as contiguous float32, refused unless llama.cpp could store
    them in ``type_name``."""
    ggml_type = GGML_TYPES[type_name]
    rows = np.ascontiguousarray(rows, dtype=F32)
    if rows.ndim != 2 or not ggml_type.fits(rows.shape[1]):
        raise BitplanError(
            f"{type_name} needs rows of a multiple of {ggml_type.block_size} weights, "
            f"got shape {rows.shape}"
        )
    if importance is None:
        if ggml_type.needs_imatrix:
            raise BitplanError(
                f"{type_name} needs an importance matrix, as in llama-quantize: pass importance= "
                "(bitplan.scoring.importance.collect_importance(model, tokens) collects one)"
            )
        return rows, None
    importance = np.ascontiguousarray(importance, dtype=F32).reshape(-1)
    if importance.shape[0] != rows.shape[1]:
        raise BitplanError(
            f"the importance vector has {importance.shape[0]} entries, the rows {rows.shape[1]}"
        )
    return rows, importance


def quantize_rows(
    rows: np.ndarray, type_name: str, importance: np.ndarray | None = None
) -> np.ndarray:
    """Quantize float32 ``rows`` (n_rows, row_length) to llama.cpp's bytes of ``type_name``
    (``"Q4_K"`` ...): an (n_rows, row_bytes) uint8 array, what ``ggml_quantize_chunk`` writes.

    ``importance`` (row_length,) is llama.cpp's imatrix for this tensor, or None (refused for
    the types llama-quantize refuses without one). The work is done by llama.cpp's own ggml
    when llama-cpp-python is installed (2-12x faster than the port, single-threaded, and the
    same bytes: the tests check both), else by the numpy port, which has no i-quants.
    """
    rows, importance = _checked(rows, type_name, importance)
    if type_name in ("F16", "F32") or (type_name in PORTED_TYPES and not ggml_available()):
        return _port_quantize(rows, type_name, importance)
    return ggml_quantize_rows(rows, type_name, importance)


def port_quantize_rows(
    rows: np.ndarray, type_name: str, importance: np.ndarray | None = None
) -> np.ndarray:
    """:func:`quantize_rows` by bitplan's numpy port of ``ggml-quants.c``, for the types in
    :data:`PORTED_TYPES`."""
    if type_name not in PORTED_TYPES:
        raise BitplanError(f"bitplan's numpy port has no {type_name}; llama.cpp's ggml does")
    rows, importance = _checked(rows, type_name, importance)
    return _port_quantize(rows, type_name, importance)


def _port_quantize(rows: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    n_rows = rows.shape[0]
    if GGML_TYPES[type_name].block_size == QK_K:
        blocks = rows.reshape(-1, QK_K)
        # The imatrix of every super-block: the row's vector, repeated for every row.
        block_importance = None if importance is None else np.tile(importance, n_rows)
    with np.errstate(all="ignore"):
        if type_name == "Q2_K":
            out = _quantize_q2_k(blocks, block_importance)
        elif type_name == "Q3_K":
            out = _quantize_q3_k(blocks, block_importance)
        elif type_name in ("Q4_K", "Q5_K"):
            nmax = 15 if type_name == "Q4_K" else 31
            out = _quantize_k4_k5(blocks, block_importance, nmax)
        elif type_name == "Q6_K":
            out = _quantize_q6_k(blocks, block_importance)
        elif type_name in ("Q4_0", "Q5_0"):
            out = _quantize_q4_0_q5_0(rows, importance, 4 if type_name == "Q4_0" else 5)
        elif type_name in ("Q4_1", "Q5_1"):
            out = _quantize_q4_1_q5_1(rows, importance, 4 if type_name == "Q4_1" else 5)
        elif type_name == "Q8_0":
            out = _quantize_q8_0(rows)
        elif type_name == "MXFP4":
            out = _quantize_mxfp4(rows)
        elif type_name == "BF16":
            out = _quantize_bf16(rows)
        elif type_name == "F16":
            out = rows.astype("<f2").view(np.uint8)
        else:  # F32
            out = rows.astype("<f4").view(np.uint8)
    return np.ascontiguousarray(out).reshape(n_rows, -1)


def dequantize_rows(data: np.ndarray, type_name: str) -> np.ndarray:
    """Bytes of ``type_name`` (n_rows, row_bytes) back to float32 (n_rows, row_length), with
    the ``gguf`` package's reference dequantizers."""
    ggml_type = GGML_TYPES[type_name]
    return gguf_quants.dequantize(np.ascontiguousarray(data, np.uint8), ggml_type.ggml).astype(F32)


# ---------------------------------------------------------------------------------------------
# The format.

_PREFIX = "gguf:"
#: Names that bitplan already uses for its own (different) formats: these GGUF types are only
#: reachable with the ``gguf:`` prefix.
_PREFIXED = {"MXFP4", "BF16"}
# q4_k_s / q4_k_m / q3_k_l: llama.cpp's whole-model mixes; as one tensor's type, the k-quant.
_MIX_SUFFIX = re.compile(r"(q[2-6]_k)_(?:xs|s|m|l)")


@dataclass(frozen=True)
class GGUFFormat(Format):
    """A llama.cpp tensor type, e.g. ``GGUFFormat("Q4_K")``. It quantizes activations as
    llama.cpp's CPU matmuls do for the type (``gguf_activations``): 8-bit blocks that cost no
    file bytes but, on some models, much of a file's KL, so the scores count them."""

    type_name: str
    quantizes_activations = True

    def __post_init__(self) -> None:
        if self.type_name not in GGML_TYPES:
            raise BitplanError(
                f"unknown GGUF type {self.type_name!r}; known: {', '.join(GGML_TYPES)}"
            )

    @property
    def name(self) -> str:
        lower = self.type_name.lower()
        return _PREFIX + lower if self.type_name in _PREFIXED else lower

    @property
    def requires_importance(self) -> bool:
        """llama-quantize refuses this type without an imatrix (a row that falls back to another
        type does not need one, but a plan cannot count on that)."""
        return GGML_TYPES[self.type_name].needs_imatrix

    def requires_importance_for(self, row_length: int) -> bool:
        return resolve_type(self.type_name, row_length).needs_imatrix

    def tensor_type(self, shape: tuple[int, int]) -> str:
        """The llama.cpp type a weight of ``shape`` is stored in (after llama.cpp's fallback)."""
        _, in_features = check_weight_shape(shape)
        return resolve_type(self.type_name, in_features).name

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., in_features) rounded as llama.cpp's CPU matmul rounds a weight's input
        for the type its rows of ``in_features`` are stored in."""
        return round_activations(resolve_type(self.type_name, x.shape[-1]).activations, x)

    def quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | np.ndarray | None = None
    ) -> tuple[str, np.ndarray]:
        """The type and bytes (out_features, row_bytes) that a GGUF file stores for ``weight``."""
        check_float_tensor(weight)
        if weight.dim() != 2:
            raise BitplanError(
                f"GGUF formats quantize 2-D weights, got shape {tuple(weight.shape)}"
            )
        type_name = self.tensor_type(tuple(weight.shape))
        rows = weight.detach().to("cpu", torch.float32).numpy()
        if isinstance(importance, torch.Tensor):
            importance = importance.detach().to("cpu", torch.float32).numpy()
        return type_name, quantize_rows(rows, type_name, importance)

    def quantize_weight(
        self, weight: torch.Tensor, importance: torch.Tensor | np.ndarray | None = None
    ) -> torch.Tensor:
        """Quantize-dequantize ``weight`` as llama.cpp stores it; ``importance`` is an optional
        imatrix (in_features,) of mean squared input activations, used to choose scales, and
        required where llama-quantize requires it (``GGMLType.needs_imatrix``: IQ2_XS ...)."""
        type_name, data = self.quantize(weight, importance)
        values = torch.from_numpy(dequantize_rows(data, type_name))
        return values.to(device=weight.device, dtype=weight.dtype)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        out_features, in_features = check_weight_shape(shape)
        ggml_type = resolve_type(self.type_name, in_features)
        if not include_scales:
            return out_features * in_features * ggml_type.element_bits
        return out_features * (in_features // ggml_type.block_size) * ggml_type.type_size * 8


def makes_a_gguf_file(formats: Sequence[Format]) -> bool:
    """Whether a plan over ``formats`` is one for a GGUF file: some llama.cpp types, and
    nothing else but bf16. Such a file stores every tensor apart (so plans choose per tensor)
    and a tied output and token embedding as one tensor."""
    from bitplan.formats.bf16 import BF16Format

    gguf = [isinstance(fmt, GGUFFormat) for fmt in formats]
    return any(gguf) and all(
        g or isinstance(f, BF16Format) for g, f in zip(gguf, formats, strict=True)
    )


def check_importance_given(formats: Iterable[Format], imatrix: bool, whose: str = "") -> None:
    """Refuse, without an importance matrix (``imatrix``), formats llama.cpp quantizes only
    with one; ``whose`` starts the message (e.g. "the plan's ")."""
    needs = [fmt.name for fmt in formats if fmt.requires_importance]
    if needs and not imatrix:
        raise BitplanError(
            f"{whose}{', '.join(needs)} need an importance matrix, as in llama-quantize: "
            "add --imatrix"
        )


def gguf_format_names() -> list[str]:
    """Canonical names of every GGUF format."""
    return [GGUFFormat(name).name for name in GGML_TYPES]


def parse_gguf_name(key: str) -> GGUFFormat | None:
    """The GGUF format a lower-case ``key`` names (``q4_k``, ``gguf:q4_k_s``, ``q8_0``,
    ``gguf:mxfp4``), or None when it names none."""
    prefixed = key.startswith(_PREFIX)
    body = key[len(_PREFIX) :] if prefixed else key
    if match := _MIX_SUFFIX.fullmatch(body):
        body = match[1]
    type_name = body.upper()
    if type_name not in GGML_TYPES or (type_name in _PREFIXED and not prefixed):
        return None
    return GGUFFormat(type_name)


def bits_per_weight(type_name: str) -> float:
    """llama.cpp's bits per weight of a type: Q4_K 4.5, Q6_K 6.5625, Q8_0 8.5 ..."""
    return GGML_TYPES[type_name].bits_per_weight


__all__ = [
    "GGML_TYPES",
    "PORTED_TYPES",
    "GGMLType",
    "GGUFFormat",
    "bits_per_weight",
    "dequantize_rows",
    "gguf_format_names",
    "parse_gguf_name",
    "port_quantize_rows",
    "quantize_rows",
    "resolve_type",
]
