"""GPTQ-rounded models in exports and plans: the tuned codes and scales are stored as they are,
every export reloads to the GPTQ fake model, and plans record (and quantize applies) their
rounding."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import MIXED, by_role, make_plan

import bitplan
from bitplan.errors import BitplanError
from bitplan.exporters import export_model
from bitplan.exporters.compressed import decompress_export
from bitplan.formats import parse_format
from bitplan.model import load_model
from bitplan.plans import Plan
from bitplan.quantization import FakeQuantLinear, apply_plan, rounded_weights
from bitplan.quantization.gptq import Hessian, gptq_round

# Every family the exports store (packed: all; compressed-tensors: one scheme per fusion group).
GPTQ_MIXED = [
    {"qkv": "w4g64_asym", "o": "w3g128", "gate_up": "mxfp4", "down": "w2g128"},
    {"qkv": "mxfp8", "o": "fp8", "gate_up": "w8g32", "down": "int8"},
]


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(3))


def gptq(tiny, plan, calibration):
    return bitplan.quantize(tiny, plan, "gptq", tokens=calibration, progress=False)


def logits(module, tokens):
    with torch.no_grad():
        return module(tokens).logits


@pytest.mark.parametrize("name", ["w4g32", "w3g128_asym", "w4g48", "mxfp4", "nvfp4", "fp8", "int8"])
def test_rounded_weight_is_what_encode_and_quantize_weight_store(name):
    fmt = parse_format(name)
    weight = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    rtn = fmt.round_weight(weight)
    assert torch.equal(rtn.values(), fmt.quantize_weight(weight))
    encoded, again = fmt.encode(weight), fmt.encode_rounded(rtn)
    assert encoded.keys() == again.keys()
    assert all(torch.equal(encoded[k], again[k]) for k in encoded)
    hessian = Hessian(100)
    hessian.add(torch.randn(300, 100, generator=torch.Generator().manual_seed(2)))
    tuned = gptq_round(weight, hessian.matrix, fmt)
    assert tuned.method == "gptq" and not torch.equal(tuned.values(), rtn.values())
    # GPTQ's own scales survive storage: decode gives its weight back, bit for bit.
    assert torch.equal(fmt.decode(fmt.encode_rounded(tuned), (6, 100)), tuned.values())


def test_packed_and_fake_exports_of_a_gptq_model_reload_to_its_logits(tiny, calibration, tmp_path):
    plan = make_plan(tiny, by_role(GPTQ_MIXED))
    tuned = gptq(tiny, plan, calibration)
    rounded = rounded_weights(tuned)
    assert set(rounded) == set(plan.layer_formats)
    tokens = calibration[:2, :12]
    expected = logits(tuned, tokens)
    assert not torch.equal(expected, logits(apply_plan(tiny.module, plan), tokens))  # not RTN
    for kind in ("packed", "fake"):
        report = export_model(tiny, plan, tmp_path / kind, kind, rounded=rounded)
        loaded = load_model(tmp_path / kind)
        # the library call stores the same codes when given the GPTQ model
        again = bitplan.export(tiny, plan, tmp_path / f"{kind}-api", kind, quantized=tuned)
        torch.testing.assert_close(
            logits(load_model(again.path).module, tokens), expected, rtol=0, atol=0
        )
        torch.testing.assert_close(logits(loaded.module, tokens), expected, rtol=0, atol=0)
        assert "rounding" in json.dumps(json.loads((tmp_path / kind / "config.json").read_text()))
        assert report.path == tmp_path / kind
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"]["rounding"] == "gptq"


def test_compressed_tensors_export_of_a_gptq_model_decompresses_to_its_weights(
    tiny, calibration, tmp_path
):
    table = [{"qkv": "w4g64", "o": "w8g32", "gate_up": "w4g32", "down": "w4g128"}] * 2
    plan = make_plan(tiny, by_role(table))
    tuned = gptq(tiny, plan, calibration)
    export_model(tiny, plan, tmp_path / "ct", "compressed-tensors", rounded=rounded_weights(tuned))
    weights = decompress_export(tmp_path / "ct", exact_scales=True)
    for name in plan.layer_formats:
        assert torch.equal(weights[name], tuned.get_submodule(name).weight.float()), name


def test_gguf_and_mismatched_tuned_weights_are_refused(tiny, calibration, tmp_path):
    plan = make_plan(tiny, by_role(MIXED))
    rounded = rounded_weights(gptq(tiny, plan, calibration))
    with pytest.raises(BitplanError, match="cannot store gptq-rounded"):
        export_model(tiny, plan, tmp_path / "m.gguf", "gguf", rounded=rounded)
    other = make_plan(tiny, lambda layer: "w4g32")
    with pytest.raises(BitplanError, match="not rounded as w4g32"):
        export_model(tiny, other, tmp_path / "packed", "packed", rounded=rounded)
    assert not list(tmp_path.iterdir())


def test_plans_record_their_rounding_and_old_plan_files_load_as_rtn(tiny, tmp_path):
    plan = make_plan(tiny, lambda layer: "w4g32")
    assert plan.rounding == "rtn"
    data = plan.to_dict()
    del data["rounding"]  # a plan written before plans recorded it
    assert Plan.from_dict(data).rounding == "rtn"
    with pytest.raises(TypeError, match="rounding"):
        Plan.from_dict({**data, "rounding": "awq"})


def test_gptq_rounds_bf16_layers_to_bf16_and_lm_head_to_nearest(tiny, calibration):
    plan = make_plan(tiny, lambda layer: "bf16" if layer.role == "down" else "w4g32", True)
    tuned = gptq(tiny, plan, calibration)
    rtn = apply_plan(tiny.module, plan)
    for name, fmt in plan.layer_formats.items():
        module = tuned.get_submodule(name)
        assert isinstance(module, FakeQuantLinear)
        tuned_here = module.rounded is not None
        assert tuned_here == (fmt != "bf16" and name != "lm_head"), name
        if not tuned_here:
            assert torch.equal(module.weight, rtn.get_submodule(name).weight), name
