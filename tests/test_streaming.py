"""Streaming: scores computed one block at a time from the files equal the in-memory ones."""

from __future__ import annotations

import pytest
import torch

import bitplan
from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.formats import parse_format
from bitplan.model import load_model
from bitplan.model.streaming import load_streaming
from bitplan.plans import Plan, build_plan
from bitplan.scoring.fisher import fisher_scores

OPTIONS = [parse_format("mxfp4"), parse_format("w4g32")]


@pytest.fixture()
def tiny_folder(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_streamed_model_keeps_blocks_on_meta(tiny_folder):
    streamed, loader = load_streaming(tiny_folder)
    blocks = streamed.module.model.layers
    assert all(p.is_meta for p in blocks.parameters())
    assert not streamed.module.lm_head.weight.is_meta
    assert streamed.module.lm_head.weight is streamed.module.model.embed_tokens.weight
    block = loader.load(1)
    assert not any(p.is_meta for p in block.parameters())
    loader.unload(1)
    assert all(p.is_meta for p in block.parameters())


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_streaming_scores_equal_in_memory_scores(tiny_folder, rounding):
    tokens = torch.randint(0, 320, (5, 20), generator=torch.Generator().manual_seed(3))
    in_memory = load_model(tiny_folder)
    expected = fisher_scores(
        in_memory.module,
        in_memory.layers.decoder_layers(),
        OPTIONS,
        tokens,
        2,
        progress=False,
        rounding=rounding,
    )
    streamed, loader = load_streaming(tiny_folder)
    got = fisher_scores(
        streamed.module,
        streamed.layers.decoder_layers(),
        OPTIONS,
        tokens,
        2,
        progress=False,
        loader=loader,
        rounding=rounding,
    )
    assert got.keys() == expected.keys()
    for name in expected:
        for option in ("mxfp4", "w4g32"):
            assert got[name][option] == pytest.approx(expected[name][option], rel=1e-4), name


def test_search_with_stream_gives_the_same_plan(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    args = ["search", str(tiny_folder), "--options", "mxfp4,mxfp8", "--avg-bits", "5",
            "--n-samples", "4", "--seq-len", "32", "--no-cache"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--stream"]) == 0
    a = Plan.load(tmp_path / "a" / "plan_bitplan_5.json")
    b = Plan.load(tmp_path / "b" / "plan_bitplan_5.json")
    assert a.model == b.model  # the same weight fingerprint, streamed or not
    assert a.layer_formats == b.layer_formats


def mixed_plan(model) -> Plan:
    """w4g32 on every decoder layer but the MLPs, which get mxfp4 (both exportable in all three
    formats, and rounded by GPTQ)."""
    layers = model.layers.decoder_layers()
    formats = {layer.name: "mxfp4" if "mlp" in layer.name else "w4g32" for layer in layers}
    return build_plan(
        model.identity,
        "test",
        layers,
        {name: parse_format(fmt) for name, fmt in formats.items()},
        options=["w4g32", "mxfp4"],
        include_scales=True,
    )


@pytest.mark.parametrize("export_format", ["packed", "fake", "compressed-tensors"])
def test_streamed_export_in_shards_equals_in_memory_export(tiny_folder, tmp_path, export_format):
    from bitplan.exporters import export_model
    from bitplan.exporters.shards import INDEX_FILE, weight_files

    in_memory = load_model(tiny_folder)
    plan = mixed_plan(in_memory)
    whole = export_model(in_memory, plan, tmp_path / "whole", export_format)
    streamed, _ = load_streaming(tiny_folder)
    shard_bytes = 20_000  # far below the model's size: many shards
    sharded = export_model(
        streamed, plan, tmp_path / "sharded", export_format, max_shard_bytes=shard_bytes
    )
    files = weight_files(tmp_path / "sharded")
    assert len(files) > 3 and (tmp_path / "sharded" / INDEX_FILE).is_file()
    assert not list((tmp_path / "sharded").glob("*.part"))
    assert sharded.quantized_bytes == whole.quantized_bytes
    assert sharded.dense_bytes == whole.dense_bytes
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    if export_format == "compressed-tensors":
        from bitplan.exporters.compressed import decompress_export

        a, b = decompress_export(tmp_path / "whole"), decompress_export(tmp_path / "sharded")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return
    with torch.no_grad():
        expected = load_model(tmp_path / "whole").module(ids).logits
        got = load_model(tmp_path / "sharded").module(ids).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rounding", ["gptq", "tuned"])
def test_streamed_gptq_export_equals_in_memory_export(tiny_folder, tmp_path, rounding, monkeypatch):
    """quantize --stream --rounding gptq|tuned rounds one block at a time, its codes kept on
    disk until stored and each read back once: the export holds the same tensors as the
    in-memory one, and the temporary codes are gone."""
    from collections import Counter

    from safetensors.torch import load_file

    from bitplan.exporters.rounded_store import RoundedStore
    from bitplan.exporters.shards import weight_files

    reads, read = Counter(), RoundedStore.__getitem__
    monkeypatch.setattr(
        RoundedStore, "__getitem__", lambda store, name: reads.update([name]) or read(store, name)
    )

    mixed_plan(load_model(tiny_folder)).save(tmp_path / "plan.json")
    exports = tmp_path / "exports"
    argv = ["quantize", str(tiny_folder), "--plan", str(tmp_path / "plan.json"), "--format",
            "packed", "--rounding", rounding, "--n-samples", "4", "--seq-len", "32"]  # fmt: skip
    assert main([*argv, "--out", str(exports / "whole")]) == 0
    assert main([*argv, "--out", str(exports / "streamed"), "--stream"]) == 0
    assert reads and set(reads.values()) == {1}, reads  # checks and the report ask no more
    assert sorted(p.name for p in exports.iterdir()) == ["streamed", "whole"]

    def tensors(folder):
        return {k: v for f in weight_files(folder) for k, v in load_file(f).items()}

    whole, streamed = tensors(exports / "whole"), tensors(exports / "streamed")
    assert whole.keys() == streamed.keys()
    assert all(torch.equal(whole[k], streamed[k]) for k in whole), rounding
    streamed, _ = load_streaming(tiny_folder)
    with pytest.raises(BitplanError, match="bitplan.export"):
        bitplan.quantize(streamed, Plan.load(tmp_path / "plan.json"), rounding)
    # ... and they are not round-to-nearest's
    assert main([*argv, "--rounding", "rtn", "--out", str(tmp_path / "rtn")]) == 0
    assert any(not torch.equal(whole[k], v) for k, v in tensors(tmp_path / "rtn").items())


def test_fused_projections_stream_but_fused_experts_are_refused(tmp_path, tiny_tokenizer):
    """Phi-3's qkv_proj and gate_up_proj are single Linear layers and stream like any other;
    MoE experts stored as 3-D parameters cannot stream yet."""
    from test_architectures import ARCHITECTURES, save_tiny_model

    for arch in ("phi3", "qwen3_moe"):
        save_tiny_model(
            ARCHITECTURES[arch].config(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / arch
        )
    streamed, loader = load_streaming(tmp_path / "phi3")
    assert [layer.role for layer in streamed.layers.decoder_layers()[:4]] == [
        "o", "qkv", "gate_up", "down"
    ]  # fmt: skip
    assert not any(p.is_meta for p in loader.load(0).parameters())
    with pytest.raises(BitplanError, match="streaming does not support mixture-of-experts"):
        load_streaming(tmp_path / "qwen3_moe")
