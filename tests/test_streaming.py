"""Streaming: scores computed one block at a time from the files equal the in-memory ones."""

from __future__ import annotations

import pytest
import torch

from bitplan.cli import main
from bitplan.formats import parse_format
from bitplan.model import load_model
from bitplan.model.streaming import load_streaming
from bitplan.plan import Plan
from bitplan.score.fisher import fisher_scores

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


def test_streaming_scores_equal_in_memory_scores(tiny_folder):
    tokens = torch.randint(0, 320, (5, 20), generator=torch.Generator().manual_seed(3))
    in_memory = load_model(tiny_folder)
    expected = fisher_scores(
        in_memory.module, in_memory.layers.decoder_layers(), OPTIONS, tokens, 2, progress=False
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
