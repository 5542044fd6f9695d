"""MX formats: the OCP shared-exponent rule, hand-checked blocks, ragged blocks, activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.formats import E2M1, E4M3, MXFormat, quantize_to_minifloat

FAST = settings(max_examples=60, deadline=None)


def ocp_block_scales(x: torch.Tensor, emax: int, block_size: int = 32) -> torch.Tensor:
    """The OCP rule computed independently (float64, numpy frexp): one scale per element."""
    padded = np.pad(x.double().numpy(), [(0, 0)] * (x.dim() - 1) + [(0, -x.shape[-1] % 32)])
    blocks = padded.reshape(*padded.shape[:-1], -1, block_size)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    _, exponent = np.frexp(amax)  # amax = m * 2**exponent with m in [0.5, 1)
    shared_exp = np.where(amax > 0, exponent - 1 - emax, -127).clip(-127, 127)
    scales = np.broadcast_to(2.0**shared_exp, blocks.shape).reshape(padded.shape)
    return torch.from_numpy(scales[..., : x.shape[-1]].copy())


# ---------------------------------------------------------------- hand-checked blocks


def test_mxfp4_hand_block_with_max_6():
    # max 6 -> floor(log2 6) - 2 = 0 -> scale 1, so elements are plain E2M1 roundings.
    values = [6.0, 2.5, 3.5, 5.0, 0.25, 0.75, 1.25, -2.5, -5.0, 5.5, 0.1, -0.3]
    expected = [6.0, 2.0, 4.0, 4.0, 0.0, 1.0, 1.0, -2.0, -4.0, 6.0, 0.0, -0.5]
    x = torch.tensor([values + [0.0] * 20])
    result = MXFormat(4).quantize_weight(x)
    assert result[0, :12].tolist() == expected
    assert (result[0, 12:] == 0).all()
    # The same block scaled by 2**-10 gets scale 2**-10 and the same elements.
    assert (MXFormat(4).quantize_weight(x * 2.0**-10) * 2.0**10).tolist() == result.tolist()


def test_mxfp4_hand_block_with_max_8_gets_scale_2():
    # max 11 -> floor(log2 11) - 2 = 1 -> scale 2: 8 -> 4 * 2, 7 -> 3.5 -> 4 * 2, 1 -> 0.5 * 2,
    # 0.5 -> 0.25 (tie 0 / 0.5) -> 0, 11 -> 5.5 -> 6 * 2, -5 -> -2.5 (tie 2 / 3) -> -2 * 2.
    x = torch.tensor([[8.0, 7.0, 1.0, 0.5, 11.0, -5.0] + [0.0] * 26])
    assert MXFormat(4).quantize_weight(x)[0, :6].tolist() == [8.0, 8.0, 1.0, 0.0, 12.0, -4.0]


def test_mxfp4_largest_values_saturate_by_the_ocp_rule():
    # max 7.9 -> floor(log2 7.9) = 2 -> scale 1 -> 7.9 saturates to 6 (the spec's clipping).
    x = torch.tensor([[7.9, 1.0] + [0.0] * 30])
    assert MXFormat(4).quantize_weight(x)[0, :2].tolist() == [6.0, 1.0]


def test_mxfp6_and_mxfp8_hand_blocks():
    x6 = torch.tensor([[7.4, 3.3, 0.0625, -0.1875] + [0.0] * 28])
    assert MXFormat(6).quantize_weight(x6)[0, :4].tolist() == [7.5, 3.25, 0.0, -0.25]
    # MXFP8: emax 8. max 500 -> floor(log2 500) - 8 = 0 -> scale 1: 500 saturates to 448.
    x8 = torch.tensor([[500.0, 17.0, 19.0, 0.0] + [0.0] * 28])
    assert MXFormat(8).quantize_weight(x8)[0, :4].tolist() == [448.0, 16.0, 20.0, 0.0]
    # max 1 -> scale 2**-8: 1 / 2**-8 = 256 is exact.
    x8_small = torch.tensor([[1.0, 0.5, 2**-12] + [0.0] * 29])
    assert MXFormat(8).quantize_weight(x8_small)[0, :3].tolist() == [1.0, 0.5, 2**-12]


# ---------------------------------------------------------------- the OCP rule, property-tested


@st.composite
def tensors(draw, max_rank: int = 3):
    shape = draw(st.lists(st.integers(1, 5), min_size=0, max_size=max_rank - 1))
    shape.append(draw(st.integers(1, 100)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=generator)
    # Per-block magnitudes spread over many binades, including tiny ones near E8M0's floor.
    x *= 10.0 ** draw(st.sampled_from([-40, -5, 0, 3, 30]))
    if draw(st.booleans()):
        x[..., :32] = 0  # an all-zero block
    return x


@pytest.mark.parametrize("bits", [4, 6, 8])
@FAST
@given(x=tensors())
def test_outputs_are_element_grid_times_the_ocp_block_scale(bits, x):
    fmt = MXFormat(bits)
    scale = ocp_block_scales(x, fmt.element.max_exponent)
    result = fmt.quantize_activation(x)
    elements = result.double() / scale
    # Every element lies on the element grid (times the block's power-of-two scale) ...
    on_grid = torch.isin(elements.abs().float(), fmt.element.grid())
    assert on_grid.all()
    # ... and is the element rounding of x / scale (the rounding itself is tested elsewhere).
    expected = quantize_to_minifloat((x.double() / scale).float(), fmt.element)
    assert torch.equal(elements.float(), expected)


@FAST
@given(x=tensors(max_rank=2))
def test_quantizing_twice_changes_nothing(x):
    once = MXFormat(4).quantize_weight(x)
    assert torch.equal(MXFormat(4).quantize_weight(once), once)


def test_ragged_last_block_has_its_own_scale():
    x = torch.randn(3, 40) * 100
    x[:, 32:] = torch.randn(3, 8) * 1e-3  # a tiny 8-element tail block
    result = MXFormat(4).quantize_weight(x)
    assert torch.equal(result[:, 32:], MXFormat(4).quantize_weight(x[:, 32:].contiguous()))
    assert (result[:, 32:] != 0).any()


def test_activation_quantization_is_blockwise_along_the_last_dim_of_3d_tensors():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, generator=generator)
    fmt = MXFormat(4)
    result = fmt.quantize_activation(x)
    assert result.shape == x.shape
    assert torch.equal(result, fmt.quantize_weight(x.reshape(6, 64)).reshape(2, 3, 64))
    # Blowing up one block changes that block only.
    y = x.clone()
    y[1, 2, 32:] *= 1000
    changed = fmt.quantize_activation(y) != result
    assert changed[1, 2, 32:].any()
    changed[1, 2, 32:] = False
    assert not changed.any()


def test_zero_and_tiny_blocks():
    x = torch.zeros(2, 64)
    x[1, :32] = 1e-42  # float32 subnormals: the scale clamps at 2**-127
    result = MXFormat(8).quantize_weight(x)
    assert torch.isfinite(result).all()
    assert (result[0] == 0).all()
    assert (result[1, 32:] == 0).all()


def test_mxfp8_elements_match_torch_float8():
    x = torch.randn(4, 64) * 3
    scale = ocp_block_scales(x, E4M3.max_exponent).float()
    expected = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(MXFormat(8).quantize_weight(x), expected)


def test_element_types_and_names():
    assert MXFormat(4).element == E2M1
    assert [MXFormat(b).name for b in (4, 6, 8)] == ["mxfp4", "mxfp6", "mxfp8"]
    assert all(MXFormat(b).quantizes_activations for b in (4, 6, 8))
