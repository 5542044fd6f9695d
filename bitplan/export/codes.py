"""A layer's weight as the integers and scales a format stores, and back.

``encode_weight(w, fmt)`` returns the tensors of bitplan's packed layout (see docs/EXPORT.md):

==========  ==============================================================================
part        contents
==========  ==============================================================================
qweight     element codes, bit-packed (``packing.pack_bits``), 1-D uint8
scales      integer: float16 per group; MX: E8M0 exponents (uint8, bias 127) per 32;
            NVFP4: E4M3 (``float8_e4m3fn``) per 16; FP8: float32 per output row
zeros       asymmetric integer formats: zero points, bit-packed like qweight
global_sc.  NVFP4: the float32 tensor scale, shape ``(1,)``
weight      ``bf16`` layers: the weight in bfloat16 (16 bits per weight, nothing else)
==========  ==============================================================================

``decode_weight`` rebuilds the float32 weight with exactly the operations of the format's fake
quantizer, so it equals ``fmt.quantize_weight(w.float())`` bit for bit (the tests check every
format). ``part_bits`` is each part's share of ``fmt.weight_bits``: the parts add up to it.
"""

from __future__ import annotations

import math

import torch

from bitplan.errors import BitplanError
from bitplan.export.packing import (
    codes_to_minifloat,
    minifloat_to_codes,
    pack_bits,
    unpack_bits,
)
from bitplan.formats import (
    BF16Format,
    Format,
    FP8Format,
    Int8W8A8Format,
    IntFormat,
    MXFormat,
    NVFP4Format,
)
from bitplan.formats.blocks import from_blocks, to_blocks
from bitplan.formats.integer import quantize_int_codes
from bitplan.formats.minifloat import E2M1, E4M3, power_of_two, quantize_to_minifloat
from bitplan.formats.mx import MX_BLOCK_SIZE, mx_shared_exponent
from bitplan.formats.nvfp4 import NVFP4_BLOCK_SIZE, nvfp4_scales

E8M0_BIAS = 127

#: Part name -> kind reported in size tables.
PART_KINDS = {
    "qweight": "codes",
    "weight": "codes",
    "scales": "scales",
    "global_scale": "scales",
    "zeros": "zero points",
}


def as_int_format(fmt: Format) -> IntFormat | None:
    """The integer weight format of ``fmt`` (``int8`` stores its weights as ``w8``)."""
    if isinstance(fmt, IntFormat):
        return fmt
    if isinstance(fmt, Int8W8A8Format):
        return IntFormat(8, None, symmetric=True)
    return None


def _unsupported(fmt: Format) -> BitplanError:
    return BitplanError(
        f"format {fmt.name} has no packed layout (packed: integer, MX, NVFP4, FP8, bf16); "
        "export it as fake"
    )


def part_bits(fmt: Format, shape: tuple[int, int]) -> dict[str, int]:
    """Exact bits of each stored part of a weight of ``shape``; they sum to
    ``fmt.weight_bits(shape)``."""
    out_features, in_features = shape
    n = out_features * in_features
    if (int_fmt := as_int_format(fmt)) is not None:
        groups = out_features * math.ceil(in_features / (int_fmt.group_size or in_features))
        parts = {"qweight": int_fmt.bits * n, "scales": 16 * groups}
        if not int_fmt.symmetric:
            parts["zeros"] = int_fmt.bits * groups
        return parts
    if isinstance(fmt, MXFormat):
        blocks = out_features * math.ceil(in_features / MX_BLOCK_SIZE)
        return {"qweight": fmt.bits * n, "scales": 8 * blocks}
    if isinstance(fmt, NVFP4Format):
        blocks = out_features * math.ceil(in_features / NVFP4_BLOCK_SIZE)
        return {"qweight": 4 * n, "scales": 8 * blocks, "global_scale": 32}
    if isinstance(fmt, FP8Format):
        return {"qweight": 8 * n, "scales": 32 * out_features}
    if isinstance(fmt, BF16Format):
        return {"weight": 16 * n}
    raise _unsupported(fmt)


def encode_weight(weight: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
    """The stored parts of ``weight`` (out, in) quantized with ``fmt``."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    if (int_fmt := as_int_format(fmt)) is not None:
        codes, scale, zero_point = quantize_int_codes(
            w, int_fmt.bits, int_fmt.group_size, int_fmt.symmetric
        )
        if int_fmt.symmetric:
            codes = codes + 2 ** (int_fmt.bits - 1)  # offset binary: unsigned codes
        parts = {"qweight": pack_bits(codes, int_fmt.bits), "scales": scale.half()}
        if zero_point is not None:
            parts["zeros"] = pack_bits(zero_point, int_fmt.bits)
        return parts
    if isinstance(fmt, MXFormat):
        blocks = to_blocks(w, MX_BLOCK_SIZE)
        exponent = mx_shared_exponent(blocks, fmt.element)
        elements = quantize_to_minifloat(blocks / power_of_two(exponent), fmt.element)
        codes = minifloat_to_codes(from_blocks(elements, in_features), fmt.element)
        scales = (exponent.squeeze(-1) + E8M0_BIAS).to(torch.uint8)
        return {"qweight": pack_bits(codes, fmt.bits), "scales": scales}
    if isinstance(fmt, NVFP4Format):
        blocks = to_blocks(w, NVFP4_BLOCK_SIZE)
        global_scale, block_scale = nvfp4_scales(blocks)
        full_scale = block_scale * global_scale
        divisor = torch.where(full_scale > 0, full_scale, torch.ones_like(full_scale))
        elements = quantize_to_minifloat(blocks / divisor, E2M1)
        codes = minifloat_to_codes(from_blocks(elements, in_features), E2M1)
        return {
            "qweight": pack_bits(codes, 4),
            "scales": block_scale.squeeze(-1).to(torch.float8_e4m3fn),
            "global_scale": global_scale.reshape(1).float(),
        }
    if isinstance(fmt, FP8Format):
        scale = w.abs().amax(dim=-1, keepdim=True) / E4M3.max_normal
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = minifloat_to_codes(quantize_to_minifloat(w / divisor, E4M3), E4M3)
        return {"qweight": pack_bits(codes, 8), "scales": scale.squeeze(-1)}
    if isinstance(fmt, BF16Format):
        return {"weight": w.to(torch.bfloat16)}
    raise _unsupported(fmt)


def _expected_parts(fmt: Format, shape: tuple[int, int]) -> set[str]:
    return set(part_bits(fmt, shape))


def decode_weight(
    parts: dict[str, torch.Tensor], fmt: Format, shape: tuple[int, int]
) -> torch.Tensor:
    """The float32 weight of ``shape`` that ``parts`` (from :func:`encode_weight`) store."""
    out_features, in_features = shape
    n = out_features * in_features
    missing = _expected_parts(fmt, shape) - set(parts)
    if missing:
        raise BitplanError(f"a {fmt.name} layer needs {', '.join(sorted(missing))} as well")
    if (int_fmt := as_int_format(fmt)) is not None:
        bits = int_fmt.bits
        codes = unpack_bits(parts["qweight"], bits, n).view(shape).float()
        scale = parts["scales"].float().unsqueeze(-1)
        group = int_fmt.group_size or in_features
        q = to_blocks(codes, group)
        if int_fmt.symmetric:
            q.sub_(2 ** (bits - 1))
        else:
            groups = scale.shape[-2]
            zeros = unpack_bits(parts["zeros"], bits, out_features * groups)
            q.sub_(zeros.view(out_features, groups, 1).float())
        return from_blocks(q.mul_(scale), in_features)
    if isinstance(fmt, MXFormat):
        codes = unpack_bits(parts["qweight"], fmt.bits, n).view(shape)
        elements = to_blocks(codes_to_minifloat(codes, fmt.element), MX_BLOCK_SIZE)
        exponent = parts["scales"].to(torch.int32) - E8M0_BIAS
        return from_blocks(elements.mul_(power_of_two(exponent).unsqueeze(-1)), in_features)
    if isinstance(fmt, NVFP4Format):
        codes = unpack_bits(parts["qweight"], 4, n).view(shape)
        elements = to_blocks(codes_to_minifloat(codes, E2M1), NVFP4_BLOCK_SIZE)
        block_scale = parts["scales"].float().unsqueeze(-1)
        global_scale = parts["global_scale"].float().reshape(())
        return from_blocks(elements.mul_(block_scale).mul_(global_scale), in_features)
    if isinstance(fmt, FP8Format):
        codes = unpack_bits(parts["qweight"], 8, n).view(shape)
        return codes_to_minifloat(codes, E4M3).mul_(parts["scales"].float().unsqueeze(-1))
    if isinstance(fmt, BF16Format):
        return parts["weight"].float()
    raise _unsupported(fmt)
