"""Minifloat rounding: grids, hand-checked ties, a brute-force reference, and torch's float8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.formats.minifloat import (
    E2M1,
    E2M3,
    E4M3,
    MinifloatSpec,
    floor_log2,
    power_of_two,
    quantize_to_minifloat,
)

FAST = settings(max_examples=60, deadline=None)


def reference_round(values: np.ndarray, spec: MinifloatSpec) -> np.ndarray:
    """Brute force: the nearest grid value, ties to the even code, saturating at max_normal.

    Grid values are listed in code order, so the code's last bit (the mantissa's last bit) is
    the index's parity: "ties to even" means "ties to the even index".
    """
    grid = spec.grid().double().numpy()
    magnitude = np.minimum(np.abs(values.astype(np.float64)), spec.max_normal)
    distance = np.abs(magnitude[:, None] - grid[None, :])
    best = distance.min(axis=1, keepdims=True)
    is_nearest = distance == best
    # Among the (at most two) nearest grid points prefer the even index.
    nearest_even = is_nearest & (np.arange(len(grid)) % 2 == 0)[None, :]
    choice = np.where(
        nearest_even.any(axis=1), nearest_even.argmax(axis=1), is_nearest.argmax(axis=1)
    )
    return np.sign(values) * grid[choice]


def test_e2m1_grid_is_the_ocp_value_set():
    assert E2M1.grid().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e2m3_grid_has_32_codes_up_to_7_5():
    grid = E2M3.grid().tolist()
    assert len(grid) == 32
    assert grid[:9] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    assert grid[-4:] == [6.0, 6.5, 7.0, 7.5]


def test_e4m3_grid_matches_every_finite_torch_float8_value():
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN in E4M3FN
    torch_values = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(E4M3.grid(), torch_values)
    assert E4M3.grid().max().item() == 448.0


def test_spec_properties():
    assert (E2M1.bits, E2M3.bits, E4M3.bits) == (4, 6, 8)
    assert (E2M1.bias, E2M3.bias, E4M3.bias) == (1, 1, 7)
    assert (E2M1.max_exponent, E2M3.max_exponent, E4M3.max_exponent) == (2, 2, 8)
    assert E4M3.min_normal_exponent == -6


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.25, 0.0),  # tie between 0 and 0.5: 0 has the even code
        (0.75, 1.0),  # tie between 0.5 (odd) and 1.0 (even)
        (1.25, 1.0),  # tie between 1.0 (even) and 1.5 (odd)
        (1.75, 2.0),
        (2.5, 2.0),
        (3.5, 4.0),
        (5.0, 4.0),  # tie between 4 (even mantissa) and 6
        (5.01, 6.0),
        (7.0, 6.0),  # saturates
        (1e30, 6.0),
        (float("inf"), 6.0),
        (-2.5, -2.0),
        (-5.0, -4.0),
        (-100.0, -6.0),
        (0.2, 0.0),
        (0.3, 0.5),
    ],
)
def test_e2m1_hand_checked_values(value, expected):
    result = quantize_to_minifloat(torch.tensor([value]), E2M1)
    assert result.item() == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7.4, 7.5),
        (7.75, 7.5),  # saturates
        (3.3, 3.25),  # spacing 0.25 in [2, 4)
        (0.0625, 0.0),  # subnormal tie: 0 vs 0.125
        (0.1875, 0.25),  # subnormal tie: 0.125 (odd) vs 0.25 (even)
        (4.25, 4.0),  # tie in [4, 8) with spacing 0.5
    ],
)
def test_e2m3_hand_checked_values(value, expected):
    assert quantize_to_minifloat(torch.tensor([value]), E2M3).item() == expected


@pytest.mark.parametrize("spec", [E2M1, E2M3, E4M3], ids=lambda s: s.name)
@FAST
@given(data=st.lists(st.floats(-600, 600, width=32), min_size=1, max_size=64))
def test_rounding_matches_brute_force_reference(spec, data):
    x = torch.tensor(data, dtype=torch.float32)
    expected = reference_round(x.numpy(), spec)
    assert np.array_equal(quantize_to_minifloat(x, spec).numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("spec", [E2M1, E2M3, E4M3], ids=lambda s: s.name)
def test_every_midpoint_rounds_like_the_reference(spec):
    grid = spec.grid()
    midpoints = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, midpoints, -midpoints, midpoints * 0.999, midpoints * 1.001])
    expected = reference_round(x.numpy(), spec)
    assert np.array_equal(quantize_to_minifloat(x, spec).numpy(), expected.astype(np.float32))


def _torch_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).float()


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.floats(allow_nan=False, allow_infinity=True, width=32), min_size=1, max_size=64
    )
)
def test_e4m3_equals_torch_float8_cast_on_random_floats(data):
    x = torch.tensor(data, dtype=torch.float32)
    assert torch.equal(quantize_to_minifloat(x, E4M3), _torch_e4m3(x))


@settings(max_examples=100, deadline=None)
@given(
    step_index=st.integers(0, 7),
    exponent=st.integers(-12, 9),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_e4m3_equals_torch_float8_cast_on_ties(step_index, exponent, sign):
    # E4M3 values of binade e are (16 + 2k) * 2**(e - 4); the odd multiples (17 + 2k) lie exactly
    # halfway between two of them. Halved and quartered they are ties of lower binades (or of
    # the subnormal range) too. torch and we must both round them to the even code.
    value = sign * (17 + 2 * step_index) * 2.0 ** (exponent - 4)
    x = torch.tensor([value, value / 2, value / 4], dtype=torch.float32)
    assert torch.equal(quantize_to_minifloat(x, E4M3), _torch_e4m3(x))


def test_e4m3_exhaustive_sweep_equals_torch():
    # Every float32 with a 10-bit mantissa prefix in a wide exponent range: covers all ties.
    exponents = torch.arange(-20, 11, dtype=torch.float32)
    mantissas = 1 + torch.arange(1024, dtype=torch.float32) / 1024
    x = (mantissas[None, :] * torch.exp2(exponents)[:, None]).flatten()
    x = torch.cat([x, -x, torch.zeros(1)])
    assert torch.equal(quantize_to_minifloat(x, E4M3), _torch_e4m3(x))


def test_nan_stays_nan_and_input_is_untouched():
    x = torch.tensor([float("nan"), 1.3, -7.0])
    before = x.clone()
    result = quantize_to_minifloat(x, E2M1)
    assert torch.isnan(result[0])
    assert result[1:].tolist() == [1.5, -6.0]
    assert torch.equal(x[1:], before[1:]) and torch.isnan(x[0])


def test_requires_float32():
    with pytest.raises(TypeError):
        quantize_to_minifloat(torch.ones(3, dtype=torch.float16), E2M1)


def test_floor_log2_is_exact_around_powers_of_two():
    exponents = torch.arange(-126, 128)
    powers = power_of_two(exponents)
    assert torch.equal(floor_log2(powers), exponents.to(torch.int32))
    just_below = torch.nextafter(powers[1:], torch.zeros(()))
    assert torch.equal(floor_log2(just_below), exponents[1:].to(torch.int32) - 1)
    assert floor_log2(torch.tensor([0.0, 1e-45])).tolist() == [-127, -127]


def test_power_of_two_is_exact_including_subnormals():
    exponents = torch.arange(-149, 128)
    expected = torch.tensor([2.0**e for e in exponents.tolist()], dtype=torch.float64)
    assert torch.equal(power_of_two(exponents).double(), expected)
