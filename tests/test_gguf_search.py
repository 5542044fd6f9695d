"""Searching among llama.cpp types: per tensor, over every type at once (``gguf-all``)."""

from __future__ import annotations

import dataclasses

import gguf
import pytest
from test_gguf_export import build_gguf_llama, write_tokenizer_gguf

import bitplan
from bitplan.errors import BitplanError
from bitplan.formats import parse_format_list
from bitplan.formats.gguf import gguf_format_names


def test_gguf_all_names_every_type_a_plan_can_choose():
    names = [fmt.name for fmt in parse_format_list("gguf-all")]
    assert names[0] == "q2_k" and "q8_0" in names and "gguf:bf16" in names
    assert set(names) <= set(gguf_format_names()) and not {"f16", "f32"} & set(names)
    assert [fmt.name for fmt in parse_format_list("GGUF-all,")] == names
    with pytest.raises(BitplanError, match="listed twice"):
        parse_format_list("gguf-all,q4_k")


def test_a_search_among_gguf_types_chooses_per_tensor_and_exports(
    tiny_tokenizer, tmp_path, monkeypatch
):
    """q, k and v are separate tensors in a GGUF file, so a plan of llama.cpp types may give
    them different types (other formats share one per fusion group)."""
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    model = dataclasses.replace(build_gguf_llama(len(tiny_tokenizer)), tokenizer=tiny_tokenizer)
    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False)
    result = bitplan.search(model, "gguf-all", [4.6, 6], **settings)
    for plan in result.plans:
        assert plan.group_formats.keys() == plan.layer_formats.keys()  # one unit per tensor
    qkv = [
        {result.plans[k].layer_formats[f"model.layers.{b}.self_attn.{p}_proj"] for p in "qkv"}
        for k in range(2)
        for b in range(2)
    ]
    assert any(len(formats) > 1 for formats in qkv)
    assert len(set(result.plans[1].layer_formats.values())) > 1
    metadata = write_tokenizer_gguf(tmp_path / "tokenizer.gguf", tiny_tokenizer)
    out = tmp_path / "mixed.gguf"
    bitplan.export(model, result.plans[0], out, "gguf", metadata_from=metadata)
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert len({stored[f"blk.{b}.attn_{p}.weight"] for b in range(2) for p in "qkv"}) > 1
    # with other formats in the list, fusion groups still share one
    mixed = bitplan.search(model, "q4_0,w8g32", 6, **settings).plans[0]
    assert "model.layers.0.self_attn.qkv" in mixed.group_formats
