"""Block tuning of GPTQ's rounding (``bitplan.quantization.tune``)."""

from __future__ import annotations

import pytest
import torch
from test_gptq_model import plan_for

from bitplan.errors import BitplanError
from bitplan.formats import parse_format
from bitplan.quantization import FakeQuantLinear, rounded_weights
from bitplan.quantization.gptq import Hessian, gptq_sweep
from bitplan.quantization.sequential import gptq_model
from bitplan.quantization.tune import SCALE_FACTOR_RANGE, TunableRounding


@pytest.fixture()
def tokens():
    return torch.randint(0, 320, (8, 24), generator=torch.Generator().manual_seed(5))


def swept(name: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(12, 100, generator=generator)
    hessian = Hessian(100)
    hessian.add(torch.randn(400, 100, generator=generator) * torch.rand(100, generator=generator))
    fmt = parse_format(name)
    return fmt, *gptq_sweep(weight, hessian.matrix, fmt)


@pytest.mark.parametrize("name", ["w2g32", "w3g128_asym", "w4g48", "w8", "int8"])
def test_untuned_rounding_gives_gptqs_codes_and_scales_back(name):
    fmt, rounded, latent = swept(name)
    again = TunableRounding(fmt, rounded, latent).rounded()
    assert torch.equal(again.elements, rounded.elements)
    assert torch.equal(again.scales.scale, rounded.scales.scale)
    if rounded.scales.zero_point is not None:
        assert torch.equal(again.scales.zero_point, rounded.scales.zero_point)
    # Its differentiable weight is the same weight.
    assert torch.equal(TunableRounding(fmt, rounded, latent).weight().detach(), rounded.values())


@pytest.mark.parametrize("name", ["w2g32", "w3g128_asym", "w4g48"])
@pytest.mark.parametrize("seed", [0, 1])
def test_any_offsets_and_factors_stay_on_the_formats_grid_and_in_storage(name, seed):
    """Whatever the trainable numbers hold, the codes are the format's (within range, each at
    most one step from its latent value) and storage gives the weight back bit for bit."""
    fmt, rounded, latent = swept(name, seed)
    tunable = TunableRounding(fmt, rounded, latent)
    generator = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        tunable.offset.copy_(torch.rand(tunable.offset.shape, generator=generator) * 3 - 1.5)
        factors = torch.rand(tunable.scale_factor.shape, generator=generator) * 2
        tunable.scale_factor.copy_(factors)
    tunable.clamp_()
    assert tunable.offset.abs().max() <= 0.5
    low, high = SCALE_FACTOR_RANGE
    assert low <= tunable.scale_factor.min() and tunable.scale_factor.max() <= high
    tuned = tunable.rounded()
    codes = fmt.element_codes(tuned.elements)
    assert codes.min() >= 0 and codes.max() < 2**fmt.bits
    assert torch.equal(codes, codes.round())
    assert torch.equal(fmt.decode(fmt.encode_rounded(tuned), (12, 100)), tuned.values())
    assert torch.equal(tunable.weight().detach(), tuned.values())


def test_gradients_reach_every_offset_and_factor():
    fmt, rounded, latent = swept("w2g32")
    tunable = TunableRounding(fmt, rounded, latent)
    tunable.weight().pow(2).sum().backward()
    assert tunable.offset.grad.abs().sum() > 0 and tunable.scale_factor.grad.abs().sum() > 0


def output_error(module, reference, tokens) -> float:
    with torch.no_grad():
        return (module(tokens).logits - reference(tokens).logits).pow(2).mean().item()


@pytest.mark.parametrize("target", ["block", "model"])
def test_tuning_lowers_the_output_error_of_gptq(tiny_model, tokens, target):
    """On the calibration tokens, the tuned model's logits are closer to the unquantized ones
    than GPTQ's, and every tuned layer keeps its format, on its grid."""
    formats = {n: "w2g32" for n in plan_for(tiny_model)}
    gptq = gptq_model(tiny_model, formats, tokens, progress=False)
    tuned = gptq_model(
        tiny_model, formats, tokens, progress=False, tune_iters=40, tune_target=target
    )
    assert output_error(tuned, tiny_model, tokens) < 0.9 * output_error(gptq, tiny_model, tokens)
    weights = rounded_weights(tuned)
    assert set(weights) == set(formats)
    assert all(w.method == "tuned" for w in weights.values())
    for name in formats:
        layer = tuned.get_submodule(name)
        assert isinstance(layer, FakeQuantLinear) and layer.fmt.name == "w2g32"
        assert torch.equal(layer.weight, weights[name].values().to(layer.weight.dtype))


def test_the_model_target_follows_blocks_that_have_no_planned_layer(tiny_model, tokens):
    """With block 0 left unquantized, the unquantized model's hidden states after block 1 are
    the unquantized block 1's outputs on block 1's real inputs: both targets tune alike."""
    formats = {n: "w2g32" for n in plan_for(tiny_model) if n.startswith("model.layers.1.")}
    tuned = {
        target: rounded_weights(
            gptq_model(
                tiny_model, formats, tokens, progress=False, tune_iters=8, tune_target=target
            )
        )
        for target in ("model", "block")
    }
    for name in formats:
        assert torch.equal(tuned["model"][name].values(), tuned["block"][name].values()), name


def test_formats_tuning_cannot_round_are_refused_before_any_work(tiny_model, tokens):
    formats = plan_for(tiny_model)  # has MX and FP8 layers
    with pytest.raises(BitplanError, match="block tuning supports integer"):
        gptq_model(tiny_model, formats, tokens[:0], progress=False, tune_iters=5)
    with pytest.raises(BitplanError, match="tune_target"):
        formats = {n: "w2g32" for n in formats}
        gptq_model(tiny_model, formats, tokens[:0], progress=False, tune_iters=5, tune_target="x")
