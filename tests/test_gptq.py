"""GPTQ rounding (``bitplan.quantization.gptq``) against round-to-nearest and a plain reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.errors import BitplanError
from bitplan.formats import parse_format
from bitplan.formats.blocks import from_blocks, to_blocks
from bitplan.quantization import gptq as gptq_module
from bitplan.quantization.gptq import Hessian, clipped_scales, gptq_quantize, gptq_round

# One of each family and scale rule: integer sym / asym, ragged groups, per-channel, MX, FP8 rows.
FORMATS = ["w4g32", "w2g64", "w3g128_asym", "w4", "int8", "mxfp4", "mxfp6", "mxfp8", "nvfp4", "fp8"]


def layer(seed: int, out_features: int = 12, in_features: int = 80, tokens: int = 400):
    """A random weight and correlated inputs (real activations are far from white)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    mix = torch.randn(in_features, in_features, generator=gen) / in_features**0.5
    inputs = torch.randn(tokens, in_features, generator=gen) @ mix
    hessian = Hessian(in_features)
    hessian.add(inputs)
    return weight, inputs, hessian.matrix


def output_error(weight, quantized, inputs) -> float:
    return float(((weight - quantized) @ inputs.T).square().sum())


def reference_gptq(weight, hessian, fmt, damp=0.01, order=None):
    """GPTQ as first written (optimal brain surgeon, one column at a time): round a column, move
    its error onto the columns not yet rounded with H⁻¹, then remove that column from H⁻¹.
    ``order``: the columns in that order, each group's scales fixed first from ``weight``."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    inverse = torch.linalg.inv(h)
    group = fmt.block_size(w.shape[1])
    rule = fmt.group_scale_rule(to_blocks(weight.float(), group))
    static = rule(to_blocks(weight.float(), group))
    out = torch.zeros_like(w)
    remaining = list(range(w.shape[1]) if order is None else order)
    while remaining:
        j = remaining.pop(0)
        if order is not None:
            scales = static.select_block(j // group)
        elif j % group == 0:
            scales = rule(to_blocks(w[:, j : j + group].float(), group))
        column = w[:, j : j + 1].float().unsqueeze(1)
        out[:, j] = scales.dequantize(fmt.round(column, scales)).reshape(-1).double()
        error = (w[:, j] - out[:, j]) / inverse[j, j]
        w[:, remaining] -= torch.outer(error, inverse[j, remaining])
        inverse -= torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return out.float()


@pytest.mark.parametrize("name", FORMATS)
def test_gptq_equals_the_one_column_reference(name):
    fmt = parse_format(name)
    weight, _, hessian = layer(0)
    ours = gptq_quantize(
        weight, hessian, fmt, clip=False
    )  # the reference takes the format's scales
    reference = reference_gptq(weight, hessian, fmt)
    # The same rounding almost everywhere: a value at a rounding boundary may fall either way
    # in float32, so allow a rare element one step apart.
    differ = ~torch.isclose(ours, reference, atol=1e-5, rtol=1e-4)
    assert differ.float().mean() < 0.01, name


@pytest.mark.parametrize("name", FORMATS)
def test_gptq_with_white_inputs_is_round_to_nearest(name):
    """With H = I there is nothing to compensate: GPTQ rounds exactly as RTN does."""
    fmt = parse_format(name)
    weight, _, _ = layer(1)
    for act_order in (False, True):
        rounded = gptq_quantize(
            weight, torch.eye(weight.shape[1]), fmt, damp=0.0, clip=False, act_order=act_order
        )
        assert torch.equal(rounded, fmt.quantize_weight(weight))


@pytest.mark.parametrize("name", FORMATS)
def test_act_order_equals_the_one_column_reference_in_that_order(name):
    """Columns by decreasing H diagonal, every group's scales fixed before the sweep."""
    fmt = parse_format(name)
    weight, _, hessian = layer(6)
    ours = gptq_quantize(weight, hessian, fmt, clip=False, act_order=True)
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True).tolist()
    reference = reference_gptq(weight, hessian, fmt, order=order)
    differ = ~torch.isclose(ours, reference, atol=1e-5, rtol=1e-4)
    assert differ.float().mean() < 0.01, name


@pytest.mark.parametrize("name", FORMATS)
def test_act_order_stays_on_its_grid_and_beats_round_to_nearest(name):
    """Its codes and static scales give back its values, and its output error is below RTN's
    (fixed cases, as the property test below)."""
    fmt = parse_format(name)
    for seed in range(3):
        weight, inputs, hessian = layer(10 + seed, out_features=24, in_features=96)
        rounded = gptq_round(weight, hessian, fmt, act_order=True)
        values = rounded.values()
        blocks = to_blocks(values, rounded.block_size)
        again = rounded.scales.dequantize(fmt.round(blocks, rounded.scales))
        assert torch.allclose(from_blocks(again, values.shape[1]), values)
        rtn = output_error(weight, fmt.quantize_weight(weight), inputs)
        assert output_error(weight, values, inputs) <= rtn * (1 + 1e-6) + 1e-9, (name, seed)


@settings(max_examples=100, deadline=None, derandomize=True)  # not a theorem: fixed cases
@given(
    seed=st.integers(0, 10**6),
    name=st.sampled_from(FORMATS),
    out_features=st.integers(16, 32),
    in_features=st.integers(32, 96),
)
def test_gptq_output_error_is_at_most_rtns(seed, name, out_features, in_features):
    """GPTQ is greedy, not a theorem per row: on a single row of 8 inputs it can lose to RTN
    (found by this test: 26.8 against 23.3). Summed over a layer's rows it should not."""
    fmt = parse_format(name)
    weight, inputs, hessian = layer(seed, out_features, in_features)
    rtn = output_error(weight, fmt.quantize_weight(weight), inputs)
    gptq = output_error(weight, gptq_quantize(weight, hessian, fmt), inputs)
    assert gptq <= rtn * (1 + 1e-6) + 1e-9


def test_lazy_block_width_changes_nothing():
    fmt = parse_format("w4g32")
    weight, _, hessian = layer(2, in_features=200)
    wide = gptq_quantize(weight, hessian, fmt, block_columns=128)
    narrow = gptq_quantize(weight, hessian, fmt, block_columns=32)
    assert torch.allclose(wide, narrow, atol=1e-6)


def test_hessian_accumulates_batches_like_one():
    _, inputs, whole = layer(3)
    parts = Hessian(inputs.shape[1])
    for chunk in inputs.split(64):
        parts.add(chunk.reshape(8, -1, inputs.shape[1]))
    assert torch.allclose(parts.matrix, whole, atol=1e-5)
    assert torch.allclose(whole, 2 * inputs.T @ inputs / len(inputs), atol=1e-5)


def test_a_dead_input_leaves_its_weights_at_zero():
    weight, inputs, _ = layer(4)
    inputs[:, 5] = 0.0
    hessian = Hessian(inputs.shape[1])
    hessian.add(inputs)
    rounded = gptq_quantize(weight, hessian.matrix, parse_format("w4g32"))
    assert torch.count_nonzero(rounded[:, 5]) == 0 and torch.isfinite(rounded).all()


@pytest.mark.parametrize("name", ["q4_k", "q6_k"])
def test_formats_gptq_cannot_round_yet_are_refused(name):
    weight, _, hessian = layer(5, in_features=256)
    with pytest.raises(BitplanError, match="not available"):
        gptq_quantize(weight, hessian, parse_format(name))


@pytest.mark.parametrize("name", ["w2g32", "w3g128_asym", "w4", "mxfp4", "nvfp4", "fp8"])
def test_clipping_search_never_rounds_a_block_worse_and_clips_outliers(name):
    fmt = parse_format(name)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 128, generator=gen)
    weight[:, 3] *= 6  # an outlier in every row: worth clipping at low bits
    size = fmt.block_size(128)
    blocks = to_blocks(weight, size)
    plain, clipped = fmt.find_scales(blocks), clipped_scales(fmt, blocks)
    error_plain = gptq_module._rounding_error(fmt, blocks, plain)
    error_clipped = gptq_module._rounding_error(fmt, blocks, clipped)
    assert bool((error_clipped <= error_plain).all())
    if name == "w2g32":
        assert bool((error_clipped < error_plain).any())
        assert bool((clipped.scale <= plain.scale).all())
    # GPTQ with the search: its own scales are stored, so decode gives its weight back.
    hessian = Hessian(128)
    hessian.add(torch.randn(400, 128, generator=gen))
    rounded = gptq_round(weight, hessian.matrix, fmt, clip=True)
    assert torch.equal(fmt.decode(fmt.encode_rounded(rounded), (16, 128)), rounded.values())


@pytest.mark.parametrize("name", ["w2g32", "w3g128_asym", "nvfp4"])
def test_weighted_clipping_search(name):
    """Weights of one change nothing; other weights change the choice and never give a larger
    weighted error than the format's own rule."""
    fmt = parse_format(name)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(16, 128, generator=gen)
    weight[:, 3] *= 6
    size = fmt.block_size(128)
    blocks = to_blocks(weight, size)
    ones = torch.ones(1, 1, size)
    plain = clipped_scales(fmt, blocks)
    assert torch.equal(clipped_scales(fmt, blocks, weights=ones).scale, plain.scale)
    energy = to_blocks(torch.rand(1, 128, generator=gen) * 10, size)
    weighted = clipped_scales(fmt, blocks, weights=energy)
    own = fmt.find_scales(blocks)
    error = lambda scales: gptq_module._rounding_error(fmt, blocks, scales, energy)  # noqa: E731
    assert bool((error(weighted) <= error(own)).all())
    if name != "nvfp4":  # (its 8-bit float scales move in coarser steps)
        assert not torch.equal(weighted.scale, plain.scale)  # the weights changed the choice


def test_gptq_with_the_weighted_search_stays_under_round_to_nearest():
    fmt = parse_format("w2g32")
    for seed in range(3):
        weight, inputs, hessian = layer(20 + seed, out_features=24, in_features=96)
        rtn = output_error(weight, fmt.quantize_weight(weight), inputs)
        for act_order in (False, True):
            values = gptq_quantize(weight, hessian, fmt, clip_weighted=True, act_order=act_order)
            assert output_error(weight, values, inputs) <= rtn, (seed, act_order)
