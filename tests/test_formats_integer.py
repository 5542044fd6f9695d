"""Integer formats: hand-checked vectors, the half-step error bound, ragged groups, W8A8."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.errors import BitplanError
from bitplan.formats import Int8W8A8Format, IntFormat

FAST = settings(max_examples=80, deadline=None)


def fp16(value: torch.Tensor) -> torch.Tensor:
    return value.half().float()


# ---------------------------------------------------------------- hand-checked vectors


def test_int4_symmetric_hand_vector():
    # amax 7.5 -> scale 2 * 7.5 / 15 = 1.0 exactly; codes are -8..7, ties round to even.
    w = torch.tensor([[7.5, -7.5, 0.5, 1.5, 2.5, -0.5, 3.2, -6.6]])
    expected = [[7.0, -8.0, 0.0, 2.0, 2.0, -0.0, 3.0, -7.0]]
    assert IntFormat(4, None).quantize_weight(w).tolist() == expected
    # Scaled by 1/4 everything scales with it (0.25 is exact in float16).
    assert (IntFormat(4, 8).quantize_weight(w / 4) * 4).tolist() == expected


def test_int2_asymmetric_hand_vector():
    # range [-1, 2] -> scale 3 / 3 = 1, zero point round(1 / 1) = 1, codes 0..3 = values -1..2.
    w = torch.tensor([[-1.0, 2.0, 0.5, 1.5, -0.4, 1.2]])
    expected = [[-1.0, 2.0, 0.0, 2.0, -0.0, 1.0]]
    assert IntFormat(2, None, symmetric=False).quantize_weight(w).tolist() == expected


def test_int2_asymmetric_all_positive_row_uses_zero_as_minimum():
    # range [0, 4] -> scale 4/3, stored as float16; zero point 0; codes round(w / scale).
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    scale = fp16(torch.tensor(4.0 / 3.0))
    expected = torch.tensor([[1.0, 2.0, 2.0, 3.0]]) * scale
    assert torch.equal(IntFormat(2, None, symmetric=False).quantize_weight(w), expected)


def test_int2_full_range_hand_vector():
    # Group 1's extreme is +2: scale -2 / 2 = -1 (the grid mirrored), 2 lands on code -2 exactly;
    # -0.5 is code 0.5, which rounds to even 0. Group 2's extreme is -4: scale 2, codes -2..1,
    # so 3 (code 1.5) clips to code 1 = 2. The GPTQ rule would put no weight on its -4/3 level.
    w = torch.tensor([[1.0, -0.5, 0.25, 2.0, -4.0, 1.0, 3.0, 2.0]])
    fmt = IntFormat(2, 4, full_range=True)
    assert fmt.name == "w2g4_fr"
    assert fmt.quantize_weight(w).tolist() == [[1.0, 0.0, 0.0, 2.0, -4.0, 0.0, 2.0, 2.0]]
    scales = fmt.find_scales(w.view(1, 2, 4))
    assert scales.scale.flatten().tolist() == [-1.0, 2.0]


def test_full_range_ties_take_the_negative_scale_as_auto_round():
    # |min| == max: auto-round's int_sym puts the positive extreme on the negative code.
    w = torch.tensor([[-3.0, 3.0, 0.0, 1.0]])
    assert IntFormat(3, None, full_range=True).find_scales(w.view(1, 1, 4)).scale.item() == -0.75


def test_full_range_has_no_asymmetric_form():
    with pytest.raises(BitplanError, match="full-range rule"):
        IntFormat(4, 128, symmetric=False, full_range=True)


def test_scale_is_rounded_to_float16_before_use():
    # The exact scale 2 * 0.1 / 15 = 0.013333 is stored as float16 0.013336. 0.08667 is code
    # 6.50025 under the exact scale (rounds to 7) but 6.4989 under the stored one (rounds to 6).
    w = torch.tensor([[0.1, -0.05, 0.08667, 0.0]])
    scale = fp16(torch.tensor(2 * 0.1 / 15))
    assert scale.item() == 0.013336181640625
    result = IntFormat(4, None).quantize_weight(w)
    assert torch.equal(result, torch.tensor([[7.0, -4.0, 6.0, 0.0]]) * scale)


# ---------------------------------------------------------------- the error bound


@st.composite
def int_cases(draw):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 300))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    group_size = draw(st.sampled_from([None, 1, 7, 32, 64, 128]))
    symmetric = draw(st.booleans())
    magnitude = 10.0 ** draw(st.integers(-6, 3))
    offset = draw(st.sampled_from([0.0, 0.5, -0.5]))  # shifts rows off-centre for asym
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    w = (torch.rand(rows, cols, generator=generator) - 0.5 + offset) * magnitude
    return w, IntFormat(bits, group_size, symmetric)


def padded_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    size = group_size or w.shape[1]
    padded = torch.nn.functional.pad(w, (0, -w.shape[1] % size))
    return padded.reshape(w.shape[0], -1, size)


@FAST
@given(case=int_cases())
def test_error_is_at_most_half_a_step(case):
    w, fmt = case
    result = fmt.quantize_weight(w)
    assert torch.isfinite(result).all()
    groups = padded_groups(w, fmt.group_size)
    levels = 2**fmt.bits - 1
    if fmt.symmetric:
        exact_scale = 2 * groups.abs().amax(-1, keepdim=True) / levels
    else:
        exact_scale = (
            groups.amax(-1, keepdim=True).clamp(min=0) - groups.amin(-1, keepdim=True).clamp(max=0)
        ) / levels
    stored_scale = fp16(exact_scale)
    # Half a step of the stored scale, plus what rounding the scale to float16 can shift the
    # ends of the grid by (at most levels * |scale error|); float32 arithmetic adds ulps.
    bound = 0.5 * stored_scale + levels * (exact_scale - stored_scale).abs()
    bound = bound * (1 + 1e-6) + 1e-30
    error = (padded_groups(result, fmt.group_size) - groups).abs()
    assert (error <= bound).all()


@FAST
@given(case=int_cases())
def test_outputs_lie_on_the_integer_grid(case):
    w, fmt = case
    result = padded_groups(fmt.quantize_weight(w), fmt.group_size)
    groups = padded_groups(w, fmt.group_size)
    levels = 2**fmt.bits - 1
    if fmt.symmetric:
        scale = fp16(2 * groups.abs().amax(-1, keepdim=True) / levels)
        low, high = -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
    else:
        group_min = groups.amin(-1, keepdim=True).clamp(max=0)
        scale = fp16((groups.amax(-1, keepdim=True).clamp(min=0) - group_min) / levels)
        zero_point = torch.round(-group_min / torch.where(scale > 0, scale, 1)).clamp(0, levels)
        low, high = -zero_point, levels - zero_point
    codes = result / torch.where(scale > 0, scale, 1)
    assert torch.equal(codes, codes.round())
    assert ((codes >= low) & (codes <= high)).all()


def test_asymmetric_beats_symmetric_on_all_positive_rows():
    generator = torch.Generator().manual_seed(0)
    w = torch.rand(64, 256, generator=generator) + 0.1  # every row strictly positive
    for bits in (2, 3, 4):
        sym_error = (IntFormat(bits, 128).quantize_weight(w) - w).pow(2).mean()
        asym = IntFormat(bits, 128, symmetric=False).quantize_weight(w)
        assert torch.isfinite(asym).all()
        asym_error = (asym - w).pow(2).mean()
        assert asym_error < sym_error
        # Its step is max / levels, so the error is within half of that (plus float16 slack).
        step = w.reshape(64, 2, 128).amax(-1, keepdim=True) / (2**bits - 1)
        error = (asym - w).reshape(64, 2, 128).abs()
        assert (error <= 0.5 * step * 1.01).all()


# ---------------------------------------------------------------- ragged groups, edge cases


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_features", [576, 200, 100])
def test_ragged_last_group_gets_its_own_scale(in_features, symmetric):
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(6, in_features, generator=generator)
    full_groups = in_features // 128 * 128
    w[:, full_groups:] *= 1e-3  # a tiny tail: wiped out if it shared a scale with big values
    fmt = IntFormat(4, 128, symmetric)
    result = fmt.quantize_weight(w)
    # Quantizing the tail alone (one group per row) gives exactly the same values ...
    tail_alone = IntFormat(4, None, symmetric).quantize_weight(w[:, full_groups:].contiguous())
    assert torch.equal(result[:, full_groups:], tail_alone)
    # ... and so does quantizing the full groups alone.
    if full_groups:
        head_alone = fmt.quantize_weight(w[:, :full_groups].contiguous())
        assert torch.equal(result[:, :full_groups], head_alone)
    assert (result[:, full_groups:] != 0).any()


def test_group_larger_than_the_row_is_one_group():
    w = torch.randn(3, 50)
    assert torch.equal(IntFormat(4, 128).quantize_weight(w), IntFormat(4, None).quantize_weight(w))


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_rows_give_zeros_without_nan(symmetric):
    w = torch.randn(4, 256)
    w[1] = 0
    w[2, :128] = 0
    result = IntFormat(3, 128, symmetric).quantize_weight(w)
    assert torch.isfinite(result).all()
    assert (result[1] == 0).all() and (result[2, :128] == 0).all()


def test_scales_too_small_or_large_for_float16_stay_finite():
    w = torch.tensor([[1e-12, -3e-12, 0.0, 2e-12], [1e6, -2e6, 5e5, 0.0]])
    result = IntFormat(4, None).quantize_weight(w)
    assert torch.isfinite(result).all()
    assert (result[0] == 0).all()  # the float16 scale underflows to 0: the row becomes 0
    assert result[1].abs().max() <= 2e6  # the scale clips at float16's max


def test_invalid_parameters_raise():
    for bits in (1, 5, 16):
        with pytest.raises(BitplanError, match="bits"):
            IntFormat(bits, 128)
    for group_size in (0, -3, 1.5):
        with pytest.raises(BitplanError, match="group size"):
            IntFormat(4, group_size)


def test_names():
    assert IntFormat(4, 128).name == "w4g128"
    assert IntFormat(3, 64, symmetric=False).name == "w3g64_asym"
    assert IntFormat(8, None).name == "w8"
    assert IntFormat(2, None, symmetric=False).name == "w2_asym"


# ---------------------------------------------------------------- INT8 W8A8


def test_int8_weights_are_per_channel_int8():
    w = torch.randn(16, 96)
    assert torch.equal(Int8W8A8Format().quantize_weight(w), IntFormat(8, None).quantize_weight(w))


def test_int8_activations_are_per_token_with_float32_scales():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 40, generator=generator) * torch.logspace(-3, 2, 6).reshape(2, 3, 1)
    result = Int8W8A8Format().quantize_activation(x)
    scale = 2 * x.abs().amax(-1, keepdim=True) / 255  # per token, not rounded to float16
    expected = torch.round(x / scale).clamp(-128, 127) * scale
    assert torch.equal(result, expected)
    # Each token stands alone: quantizing one row by itself gives the same row.
    assert torch.equal(result[1, 2], Int8W8A8Format().quantize_activation(x[1, 2:3])[0])
    assert Int8W8A8Format().quantizes_activations
    assert not IntFormat(8, 128).quantizes_activations


def test_weight_only_formats_leave_activations_alone():
    x = torch.randn(2, 5, 64)
    assert IntFormat(4, 128).quantize_activation(x) is x


def test_bits_per_weight_of_int8():
    assert Int8W8A8Format().bits_per_weight((4096, 4096)) == 8 + 16 / 4096
    assert math.isclose(Int8W8A8Format().bits_per_weight((576, 576), include_scales=False), 8.0)


@FAST
@given(case=int_cases())
def test_full_range_reaches_each_groups_extreme_and_rounds_the_rest(case):
    w, fmt = case
    fmt = IntFormat(fmt.bits, fmt.group_size, full_range=True)
    result = padded_groups(fmt.quantize_weight(w), fmt.group_size)
    groups = padded_groups(w, fmt.group_size)
    half = 2 ** (fmt.bits - 1)
    low = groups.amin(-1, keepdim=True).clamp(max=0)
    high = groups.amax(-1, keepdim=True).clamp(min=0)
    extreme = torch.where(-low > high, low, high)
    exact_scale = -extreme / half
    scale = fp16(exact_scale)
    divisor = torch.where(scale != 0, scale, 1)
    codes = result / divisor
    assert torch.equal(codes, codes.round())
    assert ((codes >= -half) & (codes <= half - 1)).all()
    # Float16 can move the ends of the grid by half * |scale error|; float32 adds ulps.
    slack = half * (exact_scale - scale).abs() * (1 + 1e-6) + 1e-30
    error = (result - groups).abs()
    # The extreme sits on the extra code -half: exact up to the scale's float16 rounding.
    at_extreme = groups == extreme
    assert (error[at_extreme] <= slack.expand_as(groups)[at_extreme]).all()
    # Every other weight is within half a step, or clipped at the far end of the grid.
    clipped = groups.abs() - (half - 1) * scale.abs()
    bound = torch.maximum(0.5 * scale.abs(), clipped) * (1 + 1e-6) + slack
    assert (error <= bound).all()
