"""Exports of a planned tiny model: packed, fake and compressed-tensors, and loading them back."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import bitplan.exporters.packed as packed_module
from bitplan.atomic import check_output_dir, check_output_file
from bitplan.errors import BitplanError
from bitplan.exporters import export_model
from bitplan.exporters.folder import PLAN_FILE
from bitplan.exporters.report import safetensors_layout
from bitplan.formats import parse_format
from bitplan.model import load_exported, load_model
from bitplan.model.loading import LoadedModel
from bitplan.plans import Plan, build_plan
from bitplan.quantization import FakeQuantLinear, apply_plan

# By role (q, k, v share "qkv"; gate, up share "gate_up"), per block: every family of format (and both symmetric integer grids).
MIXED = [
    {"qkv": "w4g64_asym", "o": "w3g128_fr", "gate_up": "mxfp4", "down": "w2g128"},
    {"qkv": "mxfp8", "o": "fp8", "gate_up": "w8g32", "down": "int8"},
]


def make_plan(model: LoadedModel, choose, include_head: bool = False) -> Plan:
    """A plan over the model's decoder layers (and head): ``choose(layer) -> format name``."""
    layers = model.layers.selected(include_head)
    formats = {layer.name: parse_format(choose(layer)) for layer in layers}
    return build_plan(
        model.name,
        "test",
        layers,
        formats,
        options=sorted({fmt.name for fmt in formats.values()}),
        include_scales=True,
        include_head=include_head,
    )


def by_role(table):
    def choose(layer):
        role = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}
        return table[layer.block][role.get(layer.role, layer.role)]

    return choose


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(module, tokens):
    with torch.no_grad():
        return module(tokens).logits


def test_packed_reloads_to_the_fake_models_logits_exactly(tiny, tokens, tmp_path):
    plan = make_plan(tiny, by_role(MIXED))
    fake = apply_plan(tiny.module, plan)
    report = export_model(tiny, plan, tmp_path / "packed", "packed")
    assert report.path == tmp_path / "packed"
    loaded = load_model(tmp_path / "packed")  # the loader hook recognises the export
    assert loaded.note.startswith("bitplan packed export")
    for name, fmt in plan.layer_formats.items():
        layer = loaded.module.get_submodule(name)
        assert isinstance(layer, FakeQuantLinear) and layer.fmt == parse_format(fmt)
        assert torch.equal(layer.weight, fake.get_submodule(name).weight)
    assert torch.equal(logits(loaded.module, tokens), logits(fake, tokens))
    # Unquantized tensors come back as they were; the tied head stays tied.
    original = tiny.module.model.embed_tokens.weight
    assert torch.equal(loaded.module.model.embed_tokens.weight, original)
    assert loaded.module.lm_head.weight is loaded.module.model.embed_tokens.weight


def test_packed_file_size_matches_the_plans_bit_accounting(tiny, tmp_path):
    plan = make_plan(tiny, by_role(MIXED))
    report = export_model(tiny, plan, tmp_path / "packed", "packed")
    sizes, header = safetensors_layout(tmp_path / "packed" / "model.safetensors")
    shapes = {layer.name: layer.shape for layer in tiny.layers}
    for name, fmt_name in plan.layer_formats.items():
        for part, bits in parse_format(fmt_name).part_bits(shapes[name]).items():
            assert sizes[f"{name}.{part}"] == math.ceil(bits / 8), (name, part)
    # Every part of the tiny model's layers is a whole number of bytes, so exactly:
    assert report.quantized_bytes * 8 == report.plan_bits
    assert report.file_bytes == report.quantized_bytes + report.dense_bytes + header
    assert report.header_bytes == header
    assert sum(report.bytes_by_kind.values()) == report.quantized_bytes
    assert set(report.bytes_by_kind) == {"codes", "scales", "zero points"}
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitplan"
    assert config["quantization_config"]["layers"] == plan.layer_formats


def test_packed_quantized_head_is_untied(tiny, tokens, tmp_path):
    plan = make_plan(tiny, lambda layer: "w4g32" if layer.role == "lm_head" else "mxfp4", True)
    fake = apply_plan(tiny.module, plan)
    export_model(tiny, plan, tmp_path / "packed", "packed")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    loaded = load_exported(tmp_path / "packed")
    module = loaded.module
    assert module.lm_head.weight is not module.model.embed_tokens.weight
    assert torch.equal(module.model.embed_tokens.weight, tiny.module.model.embed_tokens.weight)
    assert torch.equal(module.lm_head.weight, fake.lm_head.weight)
    assert torch.equal(logits(module, tokens), logits(fake, tokens))


def test_fake_export_reloads_exactly_with_and_without_bitplan(tiny, tokens, tmp_path):
    plan = make_plan(tiny, by_role(MIXED))
    fake = apply_plan(tiny.module, plan)
    export_model(tiny, plan, tmp_path / "fake", "fake")
    config = json.loads((tmp_path / "fake" / "config.json").read_text())
    assert config["bitplan"]["layer_formats"] == plan.layer_formats
    assert set(config["bitplan"]["activation_formats"]) == {
        n for n, f in plan.layer_formats.items() if parse_format(f).quantizes_activations
    }
    # bitplan re-applies activation quantization: the same logits, bit for bit.
    loaded = load_model(tmp_path / "fake")
    assert torch.equal(logits(loaded.module, tokens), logits(fake, tokens))
    # Plain transformers: the same weights (activations then run unquantized).
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fake")
    for name in plan.layer_formats:
        assert torch.equal(plain.get_submodule(name).weight, fake.get_submodule(name).weight)
    # bf16 where exact (MX elements times powers of two), float32 elsewhere (int codes times
    # float16 scales).
    with safe_open(tmp_path / "fake" / "model.safetensors", "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in list(f.keys())}
    assert dtypes["model.layers.0.mlp.gate_proj.weight"] == "BF16"
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "F32"


def ct_config(path):
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((path / "config.json").read_text())["quantization_config"]
    return QuantizationConfig.model_validate(config)


def test_compressed_tensors_decompresses_to_the_fake_weights(tiny, tmp_path):
    from bitplan.exporters.compressed import decompress_export

    plan = make_plan(tiny, by_role(MIXED))
    fake = apply_plan(tiny.module, plan)
    report = export_model(tiny, plan, tmp_path / "ct", "compressed-tensors")
    config = ct_config(tmp_path / "ct")  # the library parses its own config
    assert config.format == "mixed-precision"
    assert config.quantization_status == "compressed"
    assert "lm_head" in config.ignore
    formats = {g.format for g in config.config_groups.values()}
    assert formats == {
        "pack-quantized",
        "int-quantized",
        "mxfp4-pack-quantized",
        "mxfp8-quantized",
        "float-quantized",
    }
    targets = [t for g in config.config_groups.values() for t in g.targets]
    assert sorted(targets) == sorted(plan.layer_formats)
    # 160 inputs with groups of 128 (down_proj, w2g128): stored as groups of 32, scales repeated.
    ragged = config.config_groups["w2g128_stored_as_g32"]
    assert ragged.weights.group_size == 32
    assert any("gcd" in note for note in report.notes)

    exact = decompress_export(tmp_path / "ct", exact_scales=True)
    library = decompress_export(tmp_path / "ct", exact_scales=False)
    for name in plan.layer_formats:
        want = fake.get_submodule(name).weight
        assert torch.equal(exact[name], want), name
        # The library's own arithmetic multiplies in float16 for integer layers.
        torch.testing.assert_close(library[name], want, rtol=2**-10, atol=0)


def test_compressed_tensors_one_format_and_dense_bf16_layers(tiny, tmp_path):
    plan = make_plan(tiny, lambda layer: "bf16" if layer.role == "o" else "w4g32")
    fake = apply_plan(tiny.module, plan)
    export_model(tiny, plan, tmp_path / "ct", "compressed-tensors")
    config = ct_config(tmp_path / "ct")
    assert config.format == "pack-quantized"
    (group,) = config.config_groups.values()
    assert group.weights.num_bits == 4 and group.weights.group_size == 32
    # bf16 layers are left dense (ignored by the quantization config) with the fake weight.
    o_proj = "model.layers.1.self_attn.o_proj"
    assert o_proj in config.ignore and o_proj not in group.targets
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        stored = f.get_tensor(f"{o_proj}.weight")
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored.float(), fake.get_submodule(o_proj).weight)


def test_compressed_tensors_refuses_a_split_fusion_group(tiny, tmp_path):
    plan = make_plan(tiny, lambda layer: "w2g32" if layer.role == "k" else "w4g32")
    with pytest.raises(BitplanError, match=r"splits fusion group model\.layers\.0\.self_attn"):
        export_model(tiny, plan, tmp_path / "ct", "compressed-tensors")
    assert list(tmp_path.iterdir()) == []
    # A group half quantized is split too (k, v left unquantized, as bf16).
    plan = make_plan(tiny, lambda layer: "bf16" if layer.role in ("k", "v", "o") else "w4g32")
    with pytest.raises(BitplanError, match="q_proj=w4g32, k_proj=dense"):
        export_model(tiny, plan, tmp_path / "ct", "compressed-tensors")


def test_compressed_tensors_refuses_what_it_cannot_represent(tiny, tmp_path):
    plan = make_plan(tiny, lambda layer: "nvfp4")
    with pytest.raises(BitplanError, match="nvfp4.*input_global_scale"):
        export_model(tiny, plan, tmp_path / "ct", "compressed-tensors")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=80,  # not a multiple of the MX block of 32
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=40,
    )
    odd = LoadedModel(LlamaForCausalLM(config), None, "odd", "memory")
    plan = make_plan(odd, lambda layer: "mxfp4")
    with pytest.raises(BitplanError, match=r"q_proj as compressed-tensors mxfp4: its 80 inputs"):
        export_model(odd, plan, tmp_path / "ct", "compressed-tensors")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    plan = make_plan(tiny, lambda layer: "w4g32")
    with pytest.raises(BitplanError, match="exists; pass --force to replace it"):
        export_model(tiny, plan, out, "packed")
    with pytest.raises(BitplanError, match="bitplan did not write it"):  # not an export
        export_model(tiny, plan, out, "packed", force=True)
    assert (out / "old.txt").exists()
    (out / PLAN_FILE).write_text("{}")  # an earlier bitplan export: --force replaces it
    export_model(tiny, plan, out, "packed", force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_write_leaves_nothing_behind(tiny, tmp_path, monkeypatch, error):
    def interrupted(*args, **kwargs):
        raise error("interrupted mid-write")

    monkeypatch.setattr(packed_module, "write_side_files", interrupted)
    plan = make_plan(tiny, lambda layer: "w4g32")
    with pytest.raises(error):
        export_model(tiny, plan, tmp_path / "out", "packed")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    # With --force, an interrupted replacement keeps the previous export.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "out" / PLAN_FILE).write_text("{}")  # an earlier bitplan export
    with pytest.raises(error):
        export_model(tiny, plan, tmp_path / "out", "packed", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "old.txt").exists()


def test_bad_requests_are_refused_before_writing(tiny, tmp_path):
    plan = make_plan(tiny, lambda layer: "w4g32")
    with pytest.raises(BitplanError, match="unknown export format 'onnx'"):
        export_model(tiny, plan, tmp_path / "out", "onnx")
    with pytest.raises(BitplanError, match="ending in .gguf"):  # gguf is one file
        export_model(tiny, plan, tmp_path / "out", "gguf")
    with pytest.raises(BitplanError, match="no option embedding_type"):
        export_model(tiny, plan, tmp_path / "out", "packed", embedding_type="q8_0")
    plan.layer_formats["model.layers.9.mlp.up_proj"] = "w4g32"
    with pytest.raises(BitplanError, match="does not have"):
        export_model(tiny, plan, tmp_path / "out", "packed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BitplanError, match="not a bitplan packed or fake export"):
        load_exported(tmp_path)


def test_output_checks_refuse_the_wrong_kind_of_path_and_existing_ones(tmp_path):
    folder, file = tmp_path / "model", tmp_path / "model.gguf"
    folder.mkdir()
    file.write_bytes(b"x")
    with pytest.raises(BitplanError, match="is a folder"):
        check_output_file(folder, force=True)
    with pytest.raises(BitplanError, match="not a folder"):
        check_output_dir(file, force=True)
    with pytest.raises(BitplanError, match="pass --force"):
        check_output_file(file)
    with pytest.raises(BitplanError, match="pass --force"):
        check_output_dir(folder)
    assert check_output_file(file, force=True) == file
    assert check_output_dir(folder, force=True) == folder
    assert check_output_file(tmp_path / "new.gguf") == tmp_path / "new.gguf"
