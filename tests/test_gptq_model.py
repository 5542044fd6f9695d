"""GPTQ over a whole model (``bitplan.quantization.sequential``) against a plain reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.formats import parse_format
from bitplan.model.layers import build_layer_table
from bitplan.quantization import FakeQuantLinear, apply_formats
from bitplan.quantization.gptq import Hessian, gptq_round
from bitplan.quantization.sequential import gptq_model
from bitplan.scoring import fisher, score
from bitplan.scoring.replay import record_block_inputs


@pytest.fixture()
def tokens():
    return torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(7))


def plan_for(model) -> dict[str, str]:
    """Integer, MX (weights and activations) and FP8 layers in each block."""
    table = build_layer_table(model)
    by_role = {"q": "w4g32", "k": "w4g32", "v": "w4g32", "o": "mxfp4", "gate": "w2g32"}
    by_role |= {"up": "w2g32", "down": "fp8"}
    return {layer.name: by_role[layer.role] for layer in table.decoder_layers()}


def reference_gptq_model(model, formats, tokens):
    """The same algorithm the plain way: for each block in turn, full forward passes of the model
    as quantized so far, with hooks on that block's layers to collect their inputs."""
    model = apply_formats(model, {})  # a copy
    modules = dict(model.named_modules())
    for index in range(len(model.model.layers)):
        names = [n for n in formats if n.startswith(f"model.layers.{index}.")]
        inputs = {n: [] for n in names}
        handles = [
            modules[n].register_forward_pre_hook(
                lambda m, a, n=n, seen=inputs: seen[n].append(a[0])
            )
            for n in names
        ]
        with torch.no_grad():
            for batch in tokens.split(4):
                model(batch)
        for handle in handles:
            handle.remove()
        for name in names:
            fmt = parse_format(formats[name])
            hessian = Hessian(modules[name].in_features)
            for x in inputs[name]:
                hessian.add(fmt.quantize_activation(x) if fmt.quantizes_activations else x)
            rounded = gptq_round(modules[name].weight.data, hessian.matrix, fmt)
            parent, _, child = name.rpartition(".")
            setattr(
                modules[parent], child, FakeQuantLinear.from_linear(modules[name], fmt, rounded)
            )
        modules = dict(model.named_modules())
    return model


def test_block_by_block_gptq_equals_the_plain_reference(tiny_model, tokens):
    formats = plan_for(tiny_model)
    ours = gptq_model(tiny_model, formats, tokens, progress=False)
    reference = reference_gptq_model(tiny_model, formats, tokens)
    for name in formats:
        a, b = ours.get_submodule(name), reference.get_submodule(name)
        assert isinstance(a, FakeQuantLinear) and a.fmt.name == formats[name]
        differ = ~torch.isclose(a.weight, b.weight, atol=1e-5, rtol=1e-4)
        assert differ.float().mean() < 0.01, name
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_model.modules())  # untouched


def test_gptq_model_rounds_differently_from_rtn_but_on_a_grid_of_the_format(tiny_model, tokens):
    """Each group of a GPTQ integer weight holds at most 2^bits distinct values (its own grid;
    its scale came from the updated weights, so re-quantizing it to nearest may not give it
    back: an export must store GPTQ's scales), and the weights are not the RTN ones."""
    formats = plan_for(tiny_model)
    tuned = gptq_model(tiny_model, formats, tokens, progress=False)
    rtn = apply_formats(tiny_model, formats)
    for name, fmt_name in formats.items():
        weight = tuned.get_submodule(name).weight
        assert not torch.equal(weight, rtn.get_submodule(name).weight), name
        fmt = parse_format(fmt_name)
        if fmt_name.startswith("w"):
            groups = weight.reshape(weight.shape[0], -1, fmt.group_size)
            distinct = max(len(g.unique()) for row in groups for g in row)
            assert distinct <= 2**fmt.bits, name


def test_formats_gptq_cannot_round_are_refused_before_any_work(tiny_model, tokens):
    formats = dict.fromkeys(plan_for(tiny_model), "q4_k")
    with pytest.raises(BitplanError, match="q4_k"):
        gptq_model(tiny_model, formats, tokens[:0], progress=False)
    assert all(not isinstance(m, FakeQuantLinear) for m in tiny_model.modules())
    assert isinstance(tiny_model.model.layers[0].mlp.down_proj, nn.Linear)


def test_gptq_aware_scoring_rounds_block_0_as_gptq_model_does(tiny_model, tokens):
    """Block 0 sees the same inputs in both (no quantized block before it), so the weights the
    scorer measures must be the ones the GPTQ model will have."""
    options = [parse_format(name) for name in ("w2g32", "mxfp4")]
    prefix = "model.layers.0."
    modules = {
        name: module
        for name, module in tiny_model.named_modules()
        if name.startswith(prefix) and isinstance(module, nn.Linear)
    }
    with torch.no_grad():
        records = [record_block_inputs(tiny_model, batch) for batch in tokens.split(4)]
    inputs = [(record.hidden[0], record.kwargs[0]) for record in records]
    block = tiny_model.model.layers[0]
    tuned = fisher._gptq_weights(block, modules, prefix, options, inputs)
    for k, fmt in enumerate(options):
        model = gptq_model(tiny_model, dict.fromkeys(modules, fmt), tokens, progress=False)
        for name in modules:
            assert torch.equal(tuned[name][k], model.get_submodule(name).weight.float()), name


def test_gptq_aware_scores_are_lower_where_gptq_helps(tiny, tokens):
    options = ["w2g32", "w4g32"]
    rtn = score(tiny, options, tokens, cache=False, progress=False, dtype="float32")
    tuned = score(
        tiny, options, tokens, cache=False, progress=False, dtype="float32", rounding="gptq"
    )
    assert (
        tuned.extra["rounding"] == "gptq" and tuned.layer_scores.keys() == rtn.layer_scores.keys()
    )
    for option in options:
        before = sum(s[option] for s in rtn.layer_scores.values())
        after = sum(s[option] for s in tuned.layer_scores.values())
        assert after < 0.9 * before, option
    with pytest.raises(BitplanError, match="fisher scorers only"):
        score(tiny, options, tokens, scorer="delta-loss", cache=False, rounding="gptq")
    with pytest.raises(BitplanError, match="q4_k"):
        score(tiny, ["q4_k", "w4g32"], tokens, cache=False, rounding="gptq")


def test_gptq_aware_scores_are_cached_apart_from_rtn_ones(tiny, tokens, tmp_path):
    options = ["w2g32", "w4g32"]
    rtn = score(tiny, options, tokens, cache=tmp_path, progress=False, dtype="float32")
    tuned = score(tiny, options, tokens, cache=tmp_path, progress=False, dtype="float32",
                  rounding="gptq")  # fmt: skip
    assert "cache_hit" not in tuned.extra and tuned.layer_scores != rtn.layer_scores
    again = score(tiny, options, tokens, cache=tmp_path, progress=False, dtype="float32",
                  rounding="gptq")  # fmt: skip
    assert again.extra.get("cache_hit") and again.layer_scores == tuned.layer_scores
