"""Model loading and the layer table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.model import build_layer_table, load_model
from bitplan.model.bundled import DEFAULT


def test_layer_table_of_tiny_llama(tiny_model):
    table = build_layer_table(tiny_model)
    decoder = table.decoder_layers()
    assert table.num_blocks == 2
    assert len(decoder) == 2 * 7
    assert [layer.role for layer in decoder[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    groups = table.groups()
    assert len(groups) == 2 * 4
    qkv = groups["model.layers.0.self_attn.qkv"]
    assert [layer.role for layer in qkv] == ["q", "k", "v"]
    assert [layer.role for layer in groups["model.layers.1.mlp.gate_up"]] == ["gate", "up"]
    assert table.head() is not None and table.head().shape == (320, 96)
    assert table.head().block is None
    assert len(table.groups(include_head=True)) == 9
    (emb,) = table.embeddings
    assert emb.tied_to_head and emb.shape == (320, 96)
    k = next(layer for layer in decoder if layer.role == "k")
    assert k.shape == (32, 96) and k.params == 32 * 96


def test_load_hf_folder_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.name == tmp_path.name
    assert len(loaded.layers.decoder_layers()) == 14
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded.module(ids).logits, tiny_model(ids).logits, atol=1e-5)


def test_load_errors_are_one_line_and_helpful(tmp_path):
    with pytest.raises(BitplanError, match="no model at"):
        load_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BitplanError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(BitplanError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.slow
def test_embedded_default_model():
    model = load_model()
    table = model.layers
    assert table.num_blocks == 30
    assert len(table.decoder_layers()) == 30 * 7
    assert len(table.groups()) == 30 * 4
    shapes = {layer.role: layer.shape for layer in table.decoder_layers()}
    assert shapes == {
        "q": (576, 576),
        "k": (192, 576),
        "v": (192, 576),
        "o": (576, 576),
        "gate": (1536, 576),
        "up": (1536, 576),
        "down": (576, 1536),
    }
    assert "4-bit" in model.note


@pytest.mark.slow
def test_gguf_file_loads_to_the_cached_weights(tmp_path, monkeypatch):
    """Loading the GGUF file itself converts it into the cache as the bundled model was: the
    same bf16 weights."""
    cached = load_model()
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path))
    direct = load_model(DEFAULT.gguf_path())
    name = "model.layers.3.mlp.down_proj.weight"
    a = dict(direct.module.named_parameters())[name]
    b = dict(cached.module.named_parameters())[name]
    assert torch.equal(a, b)
    assert direct.identity.split("@")[1] == cached.identity.split("@")[1]  # the same weights


def test_hub_id_reads_the_hugging_face_cache_offline(
    tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    """``owner/name`` resolves to its snapshot in the hub cache (built here as huggingface_hub
    lays it out); an id the cache lacks is one clear error naming the cache."""
    import huggingface_hub.constants as hub_constants

    from bitplan.cli import main

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / "0123abcd"
    tiny_model.save_pretrained(snapshot)
    tiny_tokenizer.save_pretrained(snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-llama" is no folder here

    loaded = load_model("tiny-org/tiny-llama")
    assert loaded.name == "tiny-llama" and Path(loaded.source) == snapshot
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded.module(ids).logits, tiny_model(ids).logits, atol=1e-5)
    with pytest.raises(BitplanError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        load_model("tiny-org/absent-model")
    assert main(["search", "tiny-org/tiny-llama", "--options", "mxfp4,mxfp8", "--avg-bits", "5",
                 "--n-samples", "2", "--seq-len", "16", "--out", str(tmp_path / "plans")]) == 0  # fmt: skip
    assert (tmp_path / "plans" / "plan_bitplan_5.json").is_file()
