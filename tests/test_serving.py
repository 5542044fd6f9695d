"""--serve: options, fusion-group shapes and exports kept to what an engine can run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_architectures import ARCHITECTURES, save_tiny_model
from transformers import AutoModelForCausalLM

import bitplan
from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.formats import parse_format, parse_format_list
from bitplan.plans import PlanSpace, plan_from_formats
from bitplan.quantization import apply_plan
from bitplan.serving import RULES, check_plan, layer_refusal, option_refusal

SMALL = ["--n-samples", "4", "--seq-len", "32", "--dtype", "float32"]
EXPORT_DOC = Path(__file__).resolve().parent.parent / "docs" / "EXPORT.md"


@pytest.mark.parametrize(
    ("engine", "option", "reason"),
    [
        ("vllm", "w2g128", "4 or 8 bits"),
        ("vllm", "w3g64", "WNA16_SUPPORTED_TYPES_MAP"),
        ("vllm", "mxfp6", "no MXFP6 scheme"),
        ("vllm", "nvfp4", "input_global_scale"),
        ("vllm", "q4_k", "--serve llama.cpp"),
        ("transformers", "w4g128_asym", "asymmetric"),
        ("llama.cpp", "mxfp4", "ggml types"),
        ("llama.cpp", "w4g128", "ggml types"),
    ],
)
def test_an_option_the_engine_cannot_run_is_refused_before_loading(engine, option, reason, capsys):
    argv = ["search", "no/such-model-anywhere", "--options", f"{option},bf16", "--avg-bits", "8",
            "--serve", engine]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--serve {engine} cannot run {parse_format(option).name}" in line and reason in line


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
@pytest.mark.parametrize("option", ["w4g128", "w8g32", "w4g128_fr", "w4", "int8", "fp8", "mxfp8"])
def test_options_the_engines_run_pass(engine, option):
    assert option_refusal(engine, parse_format(option)) is None


def test_vllm_needs_stored_groups_of_32_64_or_128():
    w4g128 = parse_format("w4g128")
    assert layer_refusal("vllm", w4g128, (576, 576)) is None  # stored as groups of 64
    assert layer_refusal("vllm", w4g128, (576, 100)) is None  # one group per row
    assert "groups of 8" in layer_refusal("vllm", w4g128, (576, 200))  # gcd(200, 128)
    assert "groups of 48" in layer_refusal("vllm", parse_format("w4g48"), (96, 96))


def test_a_fusion_group_offers_only_what_the_engine_runs_in_its_shapes(tiny):
    """With the down projections reading 200 inputs, w4g128 would be stored as groups of 8:
    their groups offer w8 (one scale per row) alone, the others both."""
    layers = tuple(
        dataclasses.replace(layer, shape=(layer.shape[0], 200)) if layer.role == "down" else layer
        for layer in tiny.layers.layers
    )
    table = dataclasses.replace(tiny.layers, layers=layers)
    formats = parse_format_list("w4g128,w8")
    space = PlanSpace.build(table, formats, serve="vllm")
    offered = {unit.name: set(unit.costs) for unit in space.units}
    assert offered["model.layers.0.mlp.down_proj"] == {"w8"}
    assert offered["model.layers.0.mlp.gate_up"] == {"w4g128", "w8"}
    assert set(PlanSpace.build(table, formats).units[3].costs) == {"w4g128", "w8"}
    with pytest.raises(
        BitplanError, match="can run none of the options in model.layers.0.mlp.down"
    ):
        PlanSpace.build(table, parse_format_list("w4g128,w8g128"), serve="vllm")


def test_search_for_vllm_records_the_engine_and_quantize_writes_its_format(tiny_folder, tmp_path):
    argv = ["search", str(tiny_folder), "--options", "w4g32,w8g32", "--avg-bits", "6",
            "--serve", "vllm", "--out", str(tmp_path / "plans"), *SMALL]  # fmt: skip
    assert main(argv) == 0
    plan_path = tmp_path / "plans" / "plan_bitplan_6.json"
    assert json.loads(plan_path.read_text())["serve"] == "vllm"
    out = tmp_path / "served"
    assert main(["quantize", str(tiny_folder), "--plan", str(plan_path), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_quantize_refuses_a_plan_or_format_the_engine_cannot_take(tiny_folder, tmp_path, capsys):
    model = bitplan.load(str(tiny_folder))
    w2 = plan_from_formats(model, {x.name: "w2g32" for x in model.layers.decoder_layers()}, "t")
    plan_path = tmp_path / "w2.json"
    w2.save(plan_path)
    out = tmp_path / "out"
    argv = ["quantize", str(tiny_folder), "--plan", str(plan_path), "--out", str(out)]
    assert main([*argv, "--serve", "vllm"]) == 2
    assert "cannot run model.layers.0.self_attn.q_proj in w2g32" in capsys.readouterr().err
    assert main([*argv, "--serve", "vllm", "--format", "packed"]) == 2
    assert "reads the compressed-tensors export, not packed" in capsys.readouterr().err
    assert main(argv) == 2  # no engine, no format
    assert "--format" in capsys.readouterr().err
    assert not out.exists()


def test_llama_cpp_refuses_an_architecture_bitplan_cannot_write_before_scoring(
    tmp_path, tiny_tokenizer, monkeypatch, capsys
):
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    config = ARCHITECTURES["qwen3_moe"].config(len(tiny_tokenizer))
    save_tiny_model(config, tiny_tokenizer, tmp_path / "qwen3_moe")
    capsys.readouterr()
    argv = ["search", str(tmp_path / "qwen3_moe"), "--options", "q4_k,q8_0", "--avg-bits", "6",
            "--serve", "llama.cpp", "--out", str(tmp_path / "plans"), *SMALL]  # fmt: skip
    assert main(argv) == 2
    assert "not 'qwen3_moe'" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "scores").exists()


@pytest.mark.parametrize("option", ["w4g32", "w2g32", "w4g32_fr", "w4", "int8", "fp8"])
def test_transformers_loads_the_export_to_bitplans_model(option, tiny, tmp_path):
    """What --serve transformers allows, loaded by transformers' own compressed-tensors path:
    the same logits as bitplan's fake-quantized model, exactly, in float32."""
    plan = plan_from_formats(tiny, {x.name: option for x in tiny.layers.decoder_layers()}, "t")
    report = bitplan.export(tiny, plan, tmp_path / "ct", serve="transformers")
    assert report.format == "compressed-tensors"
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = apply_plan(tiny.module, plan)(tokens).logits
        torch.testing.assert_close(served(tokens).logits, expected, rtol=0, atol=0)


def test_mx_exports_load_in_transformers_in_bfloat16(tiny, tmp_path):
    plan = plan_from_formats(tiny, {x.name: "mxfp8" for x in tiny.layers.decoder_layers()}, "t")
    bitplan.export(tiny, plan, tmp_path / "ct", serve="transformers")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16)
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = apply_plan(tiny.module, plan)(tokens).logits
        assert torch.equal(served(tokens).logits.argmax(-1), expected.argmax(-1))


def test_vllm_notes_what_depends_on_the_gpu():
    notes = check_plan("vllm", {"a": "mxfp4", "b": "w8g128_asym"}, {"a": (64, 64), "b": (64, 64)})
    assert any("SM100" in note for note in notes) and any("Hopper" in note for note in notes)


def test_docs_tabulate_every_rule_with_its_source():
    text = EXPORT_DOC.read_text()
    for rule in RULES:
        assert rule.needs in text and rule.source in text, rule.needs
