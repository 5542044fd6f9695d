"""Bit packing, minifloat codes, each format's encode / decode of a weight, and the block-scaled
core's split of "find the scales" from "round with given scales" (bitplan.formats)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.errors import BitplanError
from bitplan.formats import E2M1, E2M3, E4M3, BlockScaledFormat, IntFormat, parse_format
from bitplan.formats.blocks import from_blocks, to_blocks
from bitplan.formats.minifloat import codes_to_minifloat, minifloat_to_codes
from bitplan.formats.packing import pack_bits, packed_nbytes, unpack_bits

ALL_FORMATS = [
    "w2g128",
    "w3g128",
    "w4g128",
    "w8g128",
    "w2g64_asym",
    "w3g128_asym",
    "w4g32_asym",
    "w8g128_asym",
    "w4",
    "w3_asym",
    "int8",
    "mxfp4",
    "mxfp6",
    "mxfp8",
    "nvfp4",
    "fp8",
    "bf16",
]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 9, 1000])
def test_pack_unpack_round_trips_exactly(bits, count):
    gen = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * bits / 8) == packed_nbytes(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_pack_layout_is_little_endian_bit_stream():
    # 3-bit codes 1, 2, 3: bits 001 010 011 -> stream LSB first: 1 | 2 << 3 | 3 << 6 = 0xD1, 0
    assert pack_bits(torch.tensor([1, 2, 3]), 3).tolist() == [0xD1, 0x00]
    # 4-bit codes: low nibble first
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]


def test_pack_refuses_out_of_range_codes_and_wrong_sizes():
    with pytest.raises(BitplanError, match="out of range"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(BitplanError, match="out of range"):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(BitplanError, match="1 to 8"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(BitplanError, match="do not hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)


@pytest.mark.parametrize("spec", [E2M1, E2M3, E4M3], ids=lambda s: s.name)
def test_minifloat_codes_round_trip_every_value(spec):
    grid = spec.grid().float()
    values = torch.cat([grid, -grid])
    codes = minifloat_to_codes(values, spec)
    assert int(codes.max()) < 2**spec.bits
    assert len(set(codes.tolist())) == values.numel()  # +0 and -0 differ by the sign bit
    decoded = codes_to_minifloat(codes, spec)
    assert torch.equal(decoded, values)
    assert torch.equal(torch.signbit(decoded), torch.signbit(values))
    # sign-magnitude with the sign on top, magnitudes in grid order
    assert codes[: grid.numel()].tolist() == list(range(grid.numel()))


def test_e4m3_codes_are_float8_bit_patterns():
    x = torch.randn(4096) * 50
    values = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    codes = minifloat_to_codes(values.float(), E4M3)
    assert torch.equal(codes.to(torch.uint8), values.view(torch.uint8))


def test_off_grid_values_are_refused():
    with pytest.raises(BitplanError, match="not on the e2m1 grid"):
        minifloat_to_codes(torch.tensor([0.75]), E2M1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric, full_range", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_int_codes_dequantize_to_fake_quantize_exactly(bits, symmetric, full_range, group_size):
    fmt = IntFormat(bits, group_size, symmetric, full_range)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(12, 160, generator=gen) * 0.02  # 160 = 128 + 32: a ragged group at 128
    x[0] = 0  # all-zero row
    x[1, :40] += 0.5  # a positive-only group
    group = group_size or 160
    scales = fmt.find_scales(to_blocks(x, fmt.block_size(160)))
    codes = from_blocks(fmt.round(to_blocks(x, group), scales), 160)
    scale = scales.scale.squeeze(-1)
    zero_point = None if scales.zero_point is None else scales.zero_point.squeeze(-1)
    assert codes.shape == x.shape
    assert torch.equal(codes, codes.round())
    assert scale.shape == (12, math.ceil(160 / group))
    assert torch.equal(scale.half().float(), scale)  # float16 values
    assert (scale < 0).any() == full_range  # only the full-range rule has signed scales
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert low <= int(codes.min()) and int(codes.max()) <= high
    assert (zero_point is None) == symmetric
    q = codes
    if zero_point is not None:
        assert int(zero_point.min()) >= 0 and int(zero_point.max()) <= 2**bits - 1
        q = q - zero_point.repeat_interleave(group, dim=1)[:, :160]
    dequantized = q * scale.repeat_interleave(group, dim=1)[:, :160]
    assert torch.equal(dequantized, fmt.quantize_weight(x))


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(24, 160), (8, 100)], ids=["160-in", "100-in-ragged"])
def test_encode_decode_equals_fake_quantization(name, shape):
    fmt = parse_format(name)
    gen = torch.Generator().manual_seed(len(name))
    w = torch.randn(*shape, generator=gen) * 0.03
    w[0] = 0
    w[1, 3] = 2.0  # an outlier
    parts = fmt.encode(w)
    assert torch.equal(fmt.decode(parts, shape), fmt.quantize_weight(w))
    # Each stored part is its exact bit count rounded up to whole bytes; they add up to the
    # format's bit accounting.
    bits = fmt.part_bits(shape)
    assert set(parts) == set(bits)
    assert sum(bits.values()) == fmt.weight_bits(shape)
    for part, tensor in parts.items():
        assert tensor.numel() * tensor.element_size() == math.ceil(bits[part] / 8), part


def test_decode_names_a_missing_part():
    fmt = parse_format("w4g128_asym")
    parts = fmt.encode(torch.randn(4, 128))
    del parts["zeros"]
    with pytest.raises(BitplanError, match="zeros"):
        fmt.decode(parts, (4, 128))


def test_bfloat16_weights_encode_like_their_fake_quantization():
    w = (torch.randn(16, 96) * 0.05).to(torch.bfloat16)
    for name in ("w4g64", "mxfp4", "fp8"):
        fmt = parse_format(name)
        decoded = fmt.decode(fmt.encode(w), (16, 96))
        assert torch.equal(decoded.to(torch.bfloat16), fmt.quantize_weight(w))


# ---------------------------------------------------------------- every format, property-tested


@st.composite
def weights(draw):
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 80)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(shape, generator=generator)
    # Magnitudes over many binades: tiny ones reach float16's and E8M0's floors, huge ones the
    # float16 ceiling of integer scales.
    w *= 10.0 ** draw(st.sampled_from([-40, -8, -2, 0, 3, 6]))
    if draw(st.booleans()):
        w[0] = 0  # an all-zero row
    if draw(st.booleans()):
        w[-1, -1] = 1e3  # an outlier
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    finite = torch.finfo(dtype).max
    return w.clamp(-finite, finite).to(dtype)  # weights are finite


@pytest.mark.parametrize("name", ALL_FORMATS)
@settings(max_examples=40, deadline=None)
@given(w=weights())
def test_fake_quantization_is_decode_of_encode(name, w):
    fmt = parse_format(name)
    shape = tuple(w.shape)
    decoded = fmt.decode(fmt.encode(w), shape)
    assert decoded.dtype == torch.float32
    fake = fmt.quantize_weight(w)
    # Equal values (an integer code of 0 has no sign, so a -0.0 of the fake quantizer may
    # decode as +0.0; torch.equal counts them equal).
    assert torch.equal(decoded.to(w.dtype), fake)
    if w.dtype == torch.float32:
        assert torch.equal(decoded, fake)
    assert sum(fmt.part_bits(shape).values()) == fmt.weight_bits(shape)


BLOCK_SCALED = [name for name in ALL_FORMATS if isinstance(parse_format(name), BlockScaledFormat)]


@pytest.mark.parametrize("name", BLOCK_SCALED)
@settings(max_examples=25, deadline=None)
@given(w=weights())
def test_find_scales_then_round_column_by_column_is_the_fake_quantizer(name, w):
    """What tuned rounding (GPTQ) does: fix every group's scales first, then round one column at
    a time with them. It must give exactly the fake quantizer's weights."""
    fmt = parse_format(name)
    w = w.float()
    in_features = w.shape[1]
    blocks = to_blocks(w, fmt.block_size(in_features))
    scales = fmt.find_scales(blocks)
    columns = [
        scales.dequantize(fmt.round(blocks[..., j : j + 1], scales))
        for j in range(blocks.shape[-1])
    ]
    result = from_blocks(torch.cat(columns, dim=-1), in_features)
    assert torch.equal(result, fmt.quantize_weight(w))


def test_formats_without_a_packed_layout_say_so():
    fmt = parse_format("q4_k")
    for call in (
        lambda: fmt.part_bits((4, 256)),
        lambda: fmt.encode(torch.randn(4, 256)),
        lambda: fmt.decode({}, (4, 256)),
    ):
        with pytest.raises(BitplanError, match="q4_k has no packed layout"):
            call()
