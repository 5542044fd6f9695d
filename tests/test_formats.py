"""What every format promises: dtypes, shapes, no in-place writes, zeros, names, exact bits."""

from __future__ import annotations

import math

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import (
    BF16Format,
    Format,
    FP8Format,
    Int8W8A8Format,
    IntFormat,
    MXFormat,
    NVFP4Format,
    known_format_names,
    parse_format,
    parse_format_list,
)

ALL_FORMATS = [parse_format(name) for name in known_format_names()]
SMOLLM2_SHAPES = {  # (out_features, in_features) of SmolLM2-135M's linear layers
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


# ---------------------------------------------------------------- the common contract


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_and_dtype_kept_and_input_untouched(fmt, dtype):
    generator = torch.Generator().manual_seed(6)
    w = torch.randn(12, 200, generator=generator).to(dtype)
    before = w.clone()
    result = fmt.quantize_weight(w)
    assert result.shape == w.shape and result.dtype == dtype
    assert torch.isfinite(result).all()
    assert torch.equal(w, before)
    assert result.data_ptr() != w.data_ptr()
    x = torch.randn(2, 3, 200, generator=generator).to(dtype)
    x_before = x.clone()
    activation = fmt.quantize_activation(x)
    assert activation.shape == x.shape and activation.dtype == dtype
    assert torch.equal(x, x_before)
    if not fmt.quantizes_activations:
        assert activation is x


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_zeros_stay_zeros(fmt):
    assert (fmt.quantize_weight(torch.zeros(8, 96)) == 0).all()
    assert (fmt.quantize_activation(torch.zeros(2, 4, 96)) == 0).all()


def error_ceiling(fmt: Format) -> float:
    """A loose ceiling on the relative MSE of Gaussian weights, to catch broken formats.

    Each extra integer bit, or extra mantissa bit of a float element, cuts the error about 4x.
    """
    if isinstance(fmt, IntFormat):
        return 4.0 ** (2 - fmt.bits)
    if isinstance(fmt, Int8W8A8Format):
        return 4.0 ** (2 - 8)
    mantissa_bits = {NVFP4Format: 1, FP8Format: 3, BF16Format: 7}.get(type(fmt))
    if isinstance(fmt, MXFormat):
        mantissa_bits = fmt.element.mantissa_bits
    return 0.1 * 4.0**-mantissa_bits


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_quantization_error_is_small_for_the_bits(fmt):
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=generator)
    relative_mse = ((fmt.quantize_weight(w) - w).pow(2).mean() / w.pow(2).mean()).item()
    assert 0 < relative_mse < error_ceiling(fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_non_float_or_empty_input_is_refused(fmt):
    with pytest.raises(BitplanError, match="floating-point"):
        fmt.quantize_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(BitplanError, match="empty"):
        fmt.quantize_weight(torch.ones(0, 4))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_names_equality_and_hashing(fmt):
    assert isinstance(fmt, Format)
    assert str(fmt) == fmt.name
    assert parse_format(fmt.name) == fmt
    assert hash(parse_format(fmt.name)) == hash(fmt)
    with pytest.raises(AttributeError):
        fmt.quantizes_activations_typo = True  # frozen dataclasses refuse new attributes


def test_formats_are_distinct_by_value():
    assert len(set(ALL_FORMATS)) == len(ALL_FORMATS)
    assert IntFormat(4, 128) == IntFormat(4, 128, symmetric=True)
    assert IntFormat(4, 128) != IntFormat(4, 64)
    assert MXFormat(4) != MXFormat(8)
    assert NVFP4Format() != FP8Format() != BF16Format()


# ---------------------------------------------------------------- bit accounting, by hand


def test_w4g128_on_4096_square_is_4_plus_16_over_128():
    fmt = IntFormat(4, 128)
    assert fmt.weight_bits((4096, 4096)) == 4096 * 4096 * 4 + 4096 * 32 * 16
    assert fmt.bits_per_weight((4096, 4096)) == 4 + 16 / 128
    assert IntFormat(4, 128, symmetric=False).bits_per_weight((4096, 4096)) == 4 + 20 / 128


def test_mx_and_nvfp4_on_4096_square():
    assert MXFormat(4).bits_per_weight((4096, 4096)) == 4.25
    assert MXFormat(6).bits_per_weight((4096, 4096)) == 6.25
    assert MXFormat(8).bits_per_weight((4096, 4096)) == 8.25
    assert NVFP4Format().bits_per_weight((4096, 4096)) == 4.5 + 32 / 4096**2
    assert NVFP4Format().weight_bits((4096, 4096)) == 4 * 4096**2 + 8 * 4096 * 256 + 32


def test_ragged_smollm2_shapes_counted_by_hand():
    w4 = IntFormat(4, 128)
    # gate/up 1536 x 576: 576 = 4 x 128 + 64 -> 5 groups per row.
    assert w4.weight_bits((1536, 576)) == 1536 * 576 * 4 + 1536 * 5 * 16 == 3_661_824
    assert w4.weight_bits((1536, 576), include_scales=False) == 3_538_944
    assert w4.bits_per_weight((1536, 576), include_scales=False) == 4.0
    assert w4.bits_per_weight((1536, 576)) == 4 + 5 * 16 / 576
    # down 576 x 1536: 1536 = 12 x 128 -> 12 groups per row.
    assert w4.weight_bits((576, 1536)) == 576 * 1536 * 4 + 576 * 12 * 16 == 3_649_536
    # asymmetric adds a 4-bit zero point per group.
    assert IntFormat(4, 128, False).weight_bits((1536, 576)) == 3_538_944 + 1536 * 5 * 20
    # q / o 576 x 576 and k / v 192 x 576.
    assert w4.weight_bits((576, 576)) == 1_327_104 + 576 * 5 * 16 == 1_373_184
    assert w4.weight_bits((192, 576)) == 442_368 + 192 * 5 * 16 == 457_728
    # Per-channel: one scale per row.
    assert IntFormat(8, None).weight_bits((192, 576)) == 192 * 576 * 8 + 192 * 16


def test_ragged_mx_and_nvfp4_blocks_counted_by_hand():
    # 100 = 3 x 32 + 4 -> 4 MX blocks per row; 100 = 6 x 16 + 4 -> 7 NVFP4 blocks per row.
    assert MXFormat(4).weight_bits((10, 100)) == 10 * 100 * 4 + 10 * 4 * 8 == 4320
    assert MXFormat(8).weight_bits((10, 100)) == 10 * 100 * 8 + 10 * 4 * 8 == 8320
    assert NVFP4Format().weight_bits((10, 100)) == 4000 + 10 * 7 * 8 + 32 == 4592
    # SmolLM2 widths are multiples of 32: MXFP4 is exactly 4.25 there.
    for shape in SMOLLM2_SHAPES.values():
        assert MXFormat(4).bits_per_weight(shape) == 4.25


def test_fp8_int8_bf16_bits():
    assert FP8Format().weight_bits((576, 576)) == 8 * 576 * 576 + 32 * 576 == 2_672_640
    assert Int8W8A8Format().weight_bits((576, 576)) == 8 * 576 * 576 + 16 * 576 == 2_663_424
    assert BF16Format().weight_bits((576, 576)) == 16 * 576 * 576 == 5_308_416
    assert BF16Format().weight_bits((576, 576), include_scales=False) == 5_308_416


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_without_scales_only_element_bits_count(fmt):
    per_element = {BF16Format: 16, FP8Format: 8, Int8W8A8Format: 8, NVFP4Format: 4}
    element_bits = per_element.get(type(fmt)) or fmt.bits
    for shape in SMOLLM2_SHAPES.values():
        assert fmt.weight_bits(shape, include_scales=False) == math.prod(shape) * element_bits
        assert fmt.weight_bits(shape) >= fmt.weight_bits(shape, include_scales=False)


@pytest.mark.parametrize("shape", [(0, 5), (3,), (2.5, 4), (1, 2, 3), "ab"])
def test_bad_shapes_raise(shape):
    with pytest.raises(BitplanError, match="shape"):
        IntFormat(4, 128).weight_bits(shape)


def test_shapes_accept_torch_size():
    assert MXFormat(4).weight_bits(torch.Size([64, 64])) == 64 * 64 * 4 + 64 * 2 * 8


# ---------------------------------------------------------------- the registry


def test_parse_known_spellings():
    assert parse_format("mxfp4") == MXFormat(4)
    assert parse_format("MXFP8") == MXFormat(8)
    assert parse_format("  mxfp6 ") == MXFormat(6)
    assert parse_format("w4g128") == IntFormat(4, 128)
    assert parse_format("w2g128") == IntFormat(2, 128)
    assert parse_format("w3g64") == IntFormat(3, 64)
    assert parse_format("w4g128_asym") == IntFormat(4, 128, symmetric=False)
    assert parse_format("W8") == IntFormat(8, None)
    assert parse_format("w4_asym") == IntFormat(4, None, symmetric=False)
    assert parse_format("w2g128_fr") == IntFormat(2, 128, full_range=True)
    assert parse_format("W4_FR") == IntFormat(4, None, full_range=True)
    assert parse_format("int8") == Int8W8A8Format()
    assert parse_format("INT8_W8A8") == Int8W8A8Format()
    assert parse_format("nvfp4") == NVFP4Format()
    assert parse_format("fp8") == FP8Format()
    assert parse_format("bf16") == BF16Format()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_auto_round_preset_names_are_group_128_full_range(bits):
    fmt = parse_format(f"W{bits}A16")
    assert fmt == IntFormat(bits, 128, full_range=True) == parse_format(f"w{bits}g128_fr")
    assert fmt.name == f"w{bits}g128_fr"


def test_known_names_cover_the_representative_list():
    names = known_format_names()
    assert len(names) == len(set(names))
    for name in ["bf16", "fp8", "int8", "mxfp4", "mxfp6", "mxfp8", "nvfp4"]:
        assert name in names
    for name in ["w2g128", "w3g128", "w4g128", "w8g128", "w4g128_asym"]:
        assert name in names
    assert [parse_format(name).name for name in names] == names


@pytest.mark.parametrize("name", ["mxfp5", "int4", "w4a8", "", "fp16", "w4g", "mx fp4"])
def test_unknown_names_list_the_known_ones(name):
    with pytest.raises(BitplanError) as error:
        parse_format(name)
    message = str(error.value)
    assert f"unknown format {name.strip()!r}" in message
    for known in ["bf16", "fp8", "int8", "mxfp4", "mxfp6", "mxfp8", "nvfp4", "w{2,3,4,8}g{group}"]:
        assert known in message


def test_close_names_get_a_suggestion():
    with pytest.raises(BitplanError, match="did you mean 'nvfp4'"):
        parse_format("nvfp3")


@pytest.mark.parametrize(
    ("name", "complaint"),
    [("w5g128", "bits"), ("w16", "bits"), ("w4g0", "group size"), ("w4g-3", "group size")],
)
def test_invalid_parameters_raise(name, complaint):
    with pytest.raises(BitplanError, match=complaint) as error:
        parse_format(name)
    assert f"invalid format {name!r}" in str(error.value)


def test_non_string_name_raises():
    with pytest.raises(BitplanError):
        parse_format(4)  # type: ignore[arg-type]


def test_parse_format_list():
    assert parse_format_list("mxfp4,mxfp8") == [MXFormat(4), MXFormat(8)]
    assert parse_format_list(" w4a16 , nvfp4, ") == [IntFormat(4, 128, True, True), NVFP4Format()]
    assert parse_format_list(["bf16", "fp8"]) == [BF16Format(), FP8Format()]


def test_parse_format_list_rejects_duplicates_and_empty_lists():
    with pytest.raises(
        BitplanError, match=r"'w4g128_fr' is listed twice \(as 'w4a16' and 'W4G128_FR'\)"
    ):
        parse_format_list("w4a16,W4G128_FR")
    with pytest.raises(BitplanError, match="no format names"):
        parse_format_list(" , ")
    with pytest.raises(BitplanError, match="unknown format 'mxfp5'"):
        parse_format_list("mxfp4,mxfp5")
