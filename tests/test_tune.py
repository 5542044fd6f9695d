"""Block tuning of GPTQ's rounding (``bitplan.quantization.tune``)."""

from __future__ import annotations

import pytest
import torch
from test_gptq_model import plan_for

from bitplan.errors import BitplanError
from bitplan.formats import parse_format
from bitplan.formats.blocks import to_blocks
from bitplan.quantization import FakeQuantLinear, rounded_weights
from bitplan.quantization.gptq import Hessian, gptq_sweep
from bitplan.quantization.sequential import GPTQSettings, gptq_model
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


@pytest.mark.parametrize(
    "name", ["w2g32", "w3g128_asym", "w4g48", "w8", "int8", "mxfp4", "mxfp8", "nvfp4", "fp8"]
)
def test_untuned_rounding_gives_gptqs_codes_and_scales_back(name):
    fmt, rounded, latent = swept(name)
    again = TunableRounding(fmt, rounded, latent).rounded()
    assert torch.equal(again.elements, rounded.elements)
    assert torch.equal(again.scales.scale, rounded.scales.scale)
    if rounded.scales.zero_point is not None:
        assert torch.equal(again.scales.zero_point, rounded.scales.zero_point)
    # Its differentiable weight is the same weight.
    assert torch.equal(TunableRounding(fmt, rounded, latent).weight().detach(), rounded.values())
    if rounded.scales.global_scale is not None:
        assert torch.equal(again.scales.global_scale, rounded.scales.global_scale)


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


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "fp8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_minifloat_offsets_move_each_weight_at_most_to_a_neighbour_and_keep_the_scales(name, seed):
    """MX, NVFP4 and FP8 tune offsets only: GPTQ's scales stay, every element stays on the grid
    within half a scale unit of its latent value's rounding, and storage gives it back."""
    fmt, rounded, latent = swept(name, seed)
    tunable = TunableRounding(fmt, rounded, latent)
    assert tunable.scale_factor is None
    generator = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        tunable.offset.copy_(torch.rand(tunable.offset.shape, generator=generator) * 3 - 1.5)
    tunable.clamp_()
    tuned = tunable.rounded()
    assert torch.equal(tuned.scales.scale, rounded.scales.scale)
    assert not torch.equal(tuned.elements, rounded.elements)
    size, divisor = rounded.block_size, rounded.scales.divisor()
    below = fmt.round(to_blocks(latent, size) - 0.5 * divisor, rounded.scales)
    above = fmt.round(to_blocks(latent, size) + 0.5 * divisor, rounded.scales)
    elements = to_blocks(tuned.elements, size)
    assert torch.all((below <= elements) & (elements <= above))
    assert torch.equal(fmt.decode(fmt.encode_rounded(tuned), (12, 100)), tuned.values())
    assert torch.equal(tunable.weight().detach(), tuned.values())


@pytest.mark.parametrize("name", ["w2g32", "mxfp4"])
def test_gradients_reach_every_offset_and_factor(name):
    fmt, rounded, latent = swept(name)
    tunable = TunableRounding(fmt, rounded, latent)
    tunable.weight().pow(2).sum().backward()
    assert tunable.offset.grad.abs().sum() > 0
    assert tunable.scale_factor is None or tunable.scale_factor.grad.abs().sum() > 0


def output_error(module, reference, tokens) -> float:
    with torch.no_grad():
        return (module(tokens).logits - reference(tokens).logits).pow(2).mean().item()


@pytest.mark.parametrize(("target", "mixed"), [("block", False), ("model", False), ("model", True)])
def test_tuning_lowers_the_output_error_of_gptq(tiny_model, tokens, target, mixed):
    """On the calibration tokens, the tuned model's logits are closer to the unquantized ones
    than GPTQ's, and every tuned layer keeps its format, on its grid: all-w2g32, or integer, MX
    (with quantized activations) and FP8 layers together."""
    formats = plan_for(tiny_model) if mixed else {n: "w2g32" for n in plan_for(tiny_model)}
    gptq = gptq_model(tiny_model, formats, tokens, progress=False)
    settings = GPTQSettings(tune_iters=40, tune_target=target)
    tuned = gptq_model(tiny_model, formats, tokens, progress=False, settings=settings)
    assert output_error(tuned, tiny_model, tokens) < 0.9 * output_error(gptq, tiny_model, tokens)
    weights = rounded_weights(tuned)
    assert set(weights) == set(formats)
    assert all(w.method == "tuned" for w in weights.values())
    for name, fmt in formats.items():
        layer = tuned.get_submodule(name)
        assert isinstance(layer, FakeQuantLinear) and layer.fmt.name == fmt
        assert torch.equal(layer.weight, weights[name].values().to(layer.weight.dtype))


def test_the_model_target_follows_blocks_that_have_no_planned_layer(tiny_model, tokens):
    """With block 0 left unquantized, the unquantized model's hidden states after block 1 are
    the unquantized block 1's outputs on block 1's real inputs: both targets tune alike."""
    formats = {n: "w2g32" for n in plan_for(tiny_model) if n.startswith("model.layers.1.")}
    tuned = {
        target: rounded_weights(
            gptq_model(
                tiny_model,
                formats,
                tokens,
                progress=False,
                settings=GPTQSettings(tune_iters=8, tune_target=target),
            )
        )
        for target in ("model", "block")
    }
    for name in formats:
        assert torch.equal(tuned["model"][name].values(), tuned["block"][name].values()), name


def test_formats_tuning_cannot_round_are_refused_before_any_work(tiny_model, tokens):
    formats = {n: "q4_k" for n in plan_for(tiny_model)}  # GGUF super-blocks: not GPTQ's
    with pytest.raises(BitplanError, match="GPTQ rounding is not available for q4_k"):
        gptq_model(
            tiny_model, formats, tokens[:0], progress=False, settings=GPTQSettings(tune_iters=5)
        )
    with pytest.raises(BitplanError, match="tune_target"):
        GPTQSettings(tune_iters=5, tune_target="x")
