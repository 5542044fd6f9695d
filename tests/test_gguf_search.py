"""Searching among llama.cpp types: per tensor, over every type at once (``gguf-all``)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math

import gguf
import pytest
import torch
from test_gguf_export import (
    KL_RATIO,
    KL_TOLERANCE,
    build_gguf_llama,
    llama_cpp_agreement,
    write_tokenizer_gguf,
)
from torch import nn

import bitplan
from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.exporters.gguf import gguf_file_bytes
from bitplan.exporters.load import read_export
from bitplan.formats import parse_format, parse_format_list
from bitplan.formats.gguf import gguf_format_names
from bitplan.plans import planning_table
from bitplan.scoring.fisher import fisher_scores


def test_gguf_all_names_every_type_a_plan_can_choose():
    names = [fmt.name for fmt in parse_format_list("gguf-all")]
    assert names[0] == "q2_k" and "q8_0" in names and "gguf:bf16" in names
    assert set(names) <= set(gguf_format_names()) and not {"f16", "f32"} & set(names)
    assert "iq4_xs" in names and "iq2_xs" not in names  # IQ2_XS needs an importance matrix
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


@pytest.fixture()
def gguf_loaded(tiny_tokenizer, tmp_path, monkeypatch):
    """The tiny llama with its tokenizer and a GGUF to copy metadata from, as a model loaded
    from a .gguf is."""
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    metadata = write_tokenizer_gguf(tmp_path / "tokenizer.gguf", tiny_tokenizer)
    model = build_gguf_llama(len(tiny_tokenizer))
    return dataclasses.replace(model, tokenizer=tiny_tokenizer, find_gguf=lambda: metadata)


def test_the_file_size_is_known_exactly_before_writing(gguf_loaded, tmp_path):
    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False)
    plans = bitplan.search(gguf_loaded, "q4_0,q5_1,q8_0,gguf:bf16", [5, 7, 12], **settings).plans
    for k, plan in enumerate(plans):
        for types in ({}, {"embedding_type": "q8_0", "output_type": "f16"}):
            path = tmp_path / f"{k}-{len(types)}.gguf"
            report = bitplan.export(gguf_loaded, plan, path, "gguf", **types)
            assert gguf_file_bytes(gguf_loaded, plan, **types) == report.file_bytes
            assert path.stat().st_size == report.file_bytes


def test_a_target_size_gives_the_largest_plan_that_fits(gguf_loaded, tmp_path):
    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False)
    options = "q4_0,q5_1,q8_0,gguf:bf16"
    (low, high) = bitplan.search(gguf_loaded, options, [4.5, 16], **settings).plans
    small, large = gguf_file_bytes(gguf_loaded, low), gguf_file_bytes(gguf_loaded, high)
    for target in (small, (small + large) // 2, large - 1000, large + 10**6):
        (plan,) = bitplan.search(gguf_loaded, options, target_size=target, **settings).plans
        size = gguf_file_bytes(gguf_loaded, plan)
        assert size <= target
        # nothing in the options' steps would have fitted too: the next budget up overflows
        if size < large:
            (bigger,) = bitplan.search(
                gguf_loaded, options, [plan.avg_bits + 0.15], **settings
            ).plans
            fits = gguf_file_bytes(gguf_loaded, bigger) <= target
            assert not fits or bigger.layer_formats == plan.layer_formats
    with pytest.raises(BitplanError, match="below the smallest file these options make"):
        bitplan.search(gguf_loaded, options, target_size=small - 1, **settings)
    with pytest.raises(BitplanError, match="llama.cpp types"):
        bitplan.search(gguf_loaded, "mxfp4,mxfp8", target_size=small, **settings)
    with pytest.raises(BitplanError, match="not both"):
        bitplan.search(gguf_loaded, options, [5], target_size=small, **settings)


def test_target_size_on_the_command_line(tiny_folder, capsys):
    argv = ["search", str(tiny_folder), "--options", "gguf-all", "--target-size"]
    assert main([*argv, "80XB"]) == 2
    assert "not a size; write e.g. 80MiB" in capsys.readouterr().err
    assert main([*argv, "80MiB", "--avg-bits", "5"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main([*argv, "80MiB"]) == 2  # a model from a folder has no GGUF metadata to size
    assert "copies the tokenizer and metadata from a GGUF file" in capsys.readouterr().err


def test_a_tied_output_is_scored_with_the_error_its_embedding_feeds_the_model(gguf_loaded):
    """In a GGUF file the tied output is also the token embedding: lm_head's score adds the
    embedding's part, ½ Σ G² ΔE² at the first block's input, which predicts the KL that
    quantizing the embedding alone causes (the sampled-label gradient predicts KL)."""
    model = gguf_loaded.module
    formats = parse_format_list("q4_0,q8_0")
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, model.config.vocab_size, (4, 32), generator=generator)
    layers = gguf_loaded.layers.selected(include_head=True)
    common = dict(dtype=torch.float32, progress=False, gradient="kl")
    plain = fisher_scores(model, layers, formats, tokens, **common)
    tied = fisher_scores(model, layers, formats, tokens, tied_embedding=True, **common)
    others = [name for name in plain if name != "lm_head"]
    assert all(tied[name] == plain[name] for name in others)
    for fmt in formats:
        predicted = tied["lm_head"][fmt.name] - plain["lm_head"][fmt.name]
        untied = copy.deepcopy(model)
        untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        with torch.no_grad():
            untied.model.embed_tokens.weight.copy_(fmt.quantize_weight(model.lm_head.weight))
        measured = kl_per_token(model, untied, tokens)
        assert 0.3 < predicted / measured < 3, (fmt.name, predicted, measured)
    # the search scores it so for GGUF options alone
    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False, include_head=True)
    scores = bitplan.search(gguf_loaded, "q4_0,q8_0", [6], **settings).scores
    assert scores.extra["tied_embedding"]
    assert not bitplan.search(gguf_loaded, "w4g32,w8g32", [6], **settings).scores.extra[
        "tied_embedding"
    ]


def test_the_embedding_error_quantizes_only_the_rows_it_reads(gguf_loaded):
    """llama.cpp types round each row on its own, so quantizing the rows of the tokens used
    gives the error of quantizing the whole table."""
    from bitplan.scoring.fisher import _embedding_errors

    embedding = gguf_loaded.module.get_input_embeddings()
    formats = parse_format_list("q4_0,q3_k,iq4_nl")
    generator = torch.Generator().manual_seed(2)
    ids = [torch.randint(1, 200, (2, 16), generator=generator) for _ in range(2)]
    grads = [torch.randn(2, 16, embedding.weight.shape[1], generator=generator) for _ in ids]
    got = _embedding_errors(embedding, formats, ids, grads, "diag")
    for fmt, error in zip(formats, got, strict=True):
        whole = fmt.quantize_weight(embedding.weight).to(embedding.weight.dtype)
        with torch.no_grad():  # as _embedding_errors computes
            expected = sum(
                0.5 * float(((g * (nn.functional.embedding(i, whole) - embedding(i))) ** 2).sum())
                for i, g in zip(ids, grads, strict=True)
            )
        assert error == pytest.approx(expected, rel=1e-5), fmt.name


def kl_per_token(base: torch.nn.Module, other: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        p = torch.log_softmax(base(tokens).logits[:, :-1].float(), -1)
        q = torch.log_softmax(other(tokens).logits[:, :-1].float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_an_importance_matrix_opens_the_types_that_need_one(gguf_loaded, tmp_path):
    every = [fmt.name for fmt in parse_format_list("gguf-all", imatrix=True)]
    assert {"iq2_xs", "iq2_xxs", "iq1_m"} <= set(every)
    with pytest.raises(BitplanError, match="need an importance matrix.*--imatrix"):
        bitplan.search(gguf_loaded, "iq2_xs,q4_0", [4])
    with pytest.raises(BitplanError, match="--imatrix is llama.cpp's"):
        bitplan.search(gguf_loaded, "w4g32,w8g32", [6], imatrix=True)
    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False)
    result = bitplan.search(gguf_loaded, "iq2_xs,q4_0,q8_0", [3.5], imatrix=True, **settings)
    (plan,) = result.plans
    assert "iq2_xs" in plan.layer_formats.values() and result.importance
    plain = bitplan.search(gguf_loaded, "q4_0,q8_0", [6], **settings).scores
    weighted = bitplan.search(gguf_loaded, "q4_0,q8_0", [6], imatrix=True, **settings).scores
    assert plain.layer_scores != weighted.layer_scores  # Q4_0 chooses scales by the imatrix
    report = bitplan.export(gguf_loaded, plan, tmp_path / "iq.gguf", importance=result.importance)
    assert report.type_counts.get("IQ2_XS", 0) > 0
    with pytest.raises(BitplanError, match="importance"):
        bitplan.export(gguf_loaded, plan, tmp_path / "none.gguf", "gguf")


def test_imatrix_on_the_command_line_is_refused_for_other_exports_before_loading(capsys):
    assert main(["search", "no/such-model-anywhere", "--options", "q4_0,q8_0", "--avg-bits",
                 "6", "--imatrix", "--quantize", "x", "--format", "packed"]) == 2  # fmt: skip
    assert "importance matrix (--imatrix) is for the gguf export, not packed" in (
        capsys.readouterr().err
    )


def test_quantize_refuses_a_plan_that_needs_an_imatrix_without_one_before_loading(
    gguf_loaded, tmp_path, capsys
):
    (plan,) = bitplan.plan(gguf_loaded, None, recipe="uniform", options="iq2_xs,q8_0").values()
    path = tmp_path / "plan.json"
    plan.save(path)
    argv = ["quantize", "no/such-model-anywhere", "--plan", str(path), "--format", "gguf"]
    assert main([*argv, "--out", str(tmp_path / "m.gguf")]) == 2
    assert "the plan's iq2_xs need an importance matrix, as in llama-quantize: add --imatrix" in (
        capsys.readouterr().err
    )


def test_the_library_export_collects_an_imatrix_when_asked(gguf_loaded, tmp_path):
    plan = bitplan.plan(gguf_loaded, None, recipe="uniform", options="iq2_xs,q8_0")
    (plan,) = plan.values()
    report = bitplan.export(gguf_loaded, plan, tmp_path / "m.gguf", imatrix=True, n_samples=2,
                            seq_len=16)  # fmt: skip
    assert report.type_counts.get("IQ2_XS", 0) > 0
    with pytest.raises(BitplanError, match="for the gguf export, not packed"):
        bitplan.export(gguf_loaded, plan, tmp_path / "p", "packed", imatrix=True)


def test_like_a_mix_keeps_the_plan_or_the_mix_whichever_measures_better(gguf_loaded, monkeypatch):
    """``--like MIX``: the mix's size is the budget; of bitplan's plan and the mix, the one
    whose file diverges less on calibration windows the scores did not use is kept."""
    from bitplan.plans import llama_cpp_mix_plan, measured

    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False)
    mix = llama_cpp_mix_plan(gguf_loaded, "Q4_K_M")
    (solved,) = bitplan.search(gguf_loaded, "gguf-all", [mix.avg_bits], **settings).plans
    tokens = measured.check_tokens(gguf_loaded, 4, 32)
    assert not torch.equal(tokens, measured.check_tokens(gguf_loaded, 0, 32)[:8])  # unseen
    best, kls = measured.least_divergent(gguf_loaded, [solved, mix], tokens)
    (kept,) = bitplan.search(gguf_loaded, "gguf-all", like="Q4_K_M", **settings).plans
    assert kept.layer_formats == [solved, mix][best].layer_formats
    assert kept.budget_avg_bits == pytest.approx(mix.avg_bits)
    assert kept.avg_bits <= mix.avg_bits + 1e-9
    # Both ways through: a measurement that prefers the other plan keeps the other plan.
    other = 1 - best
    monkeypatch.setattr(measured, "least_divergent", lambda *a, **k: (other, kls[::-1]))
    (kept,) = bitplan.search(gguf_loaded, "gguf-all", like="Q4_K_M", **settings).plans
    assert kept.layer_formats == [solved, mix][other].layer_formats


def test_the_less_divergent_plan_is_the_one_with_more_bits(gguf_loaded):
    from bitplan.plans import uniform_gguf_plan
    from bitplan.plans.measured import check_tokens, least_divergent

    low, high = (uniform_gguf_plan(gguf_loaded, fmt) for fmt in ("q2_k", "q8_0"))
    tokens = check_tokens(gguf_loaded, 4, 32, windows=2)
    best, kls = least_divergent(gguf_loaded, [low, high, low], tokens)
    assert best == 1 and 0 < kls[1] < kls[0] and kls[2] == kls[0]


def test_like_refuses_what_it_cannot_match_before_loading(gguf_loaded, tiny_folder, capsys):
    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False)
    for options, extra, message in [
        ("mxfp4,mxfp8", {}, "llama.cpp types"),
        ("gguf-all", {"avg_bits": 5}, "drop --avg-bits"),
        ("gguf-all", {"include_head": True}, "drop --quantize-head"),
    ]:
        with pytest.raises(BitplanError, match=message):
            bitplan.search(gguf_loaded, options, like="Q4_K_M", **extra, **settings)
    with pytest.raises(BitplanError, match="unknown llama.cpp mix 'Q4_K_X'"):
        bitplan.search(gguf_loaded, "gguf-all", like="Q4_K_X", **settings)
    with pytest.raises(BitplanError, match="IQ2_M needs an importance matrix: add --imatrix"):
        bitplan.search(gguf_loaded, "gguf-all", like="IQ2_M", **settings)
    argv = ["search", str(tiny_folder), "--options", "gguf-all", "--like", "Q4_K_M"]
    assert main([*argv, "--avg-bits", "5"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_plan_files_of_a_mix_have_plain_names():
    from bitplan.plans.search import plan_file_name

    plan = type("P", (), {"recipe": "llama.cpp IQ4_XS (imatrix)", "budget_avg_bits": 4.25})()
    assert plan_file_name(plan) == "plan_llama.cpp_IQ4_XS_imatrix_4p25.json"
    plan.recipe = "bitplan"
    assert plan_file_name(plan) == "plan_bitplan_4p25.json"


@pytest.fixture()
def untied_loaded(tiny_tokenizer, tmp_path, monkeypatch):
    """``gguf_loaded`` with an output head of its own: the token embedding is another tensor."""
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    metadata = write_tokenizer_gguf(tmp_path / "tokenizer.gguf", tiny_tokenizer)
    model = build_gguf_llama(len(tiny_tokenizer), tied=False)
    return dataclasses.replace(model, tokenizer=tiny_tokenizer, find_gguf=lambda: metadata)


EMBED = "model.embed_tokens"


def test_an_untied_embedding_is_scored_by_the_error_it_feeds_the_model(untied_loaded):
    """Its score, ½ Σ G² ΔE² at the first block's input, predicts the KL that quantizing the
    embedding alone causes; the output head keeps its own score."""
    model = untied_loaded.module
    formats = parse_format_list("q4_0,q8_0")
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, model.config.vocab_size, (4, 32), generator=generator)
    table = planning_table(untied_loaded.layers, formats)
    assert table.selected(include_head=True)[-1].role == "embedding"
    assert EMBED not in {layer.name for layer in table.selected()}
    assert EMBED not in {layer.name for layer in planning_table(untied_loaded.layers, [])}
    common = dict(dtype=torch.float32, progress=False, gradient="kl")
    scores = fisher_scores(model, table.selected(include_head=True), formats, tokens, **common)
    without = fisher_scores(model, untied_loaded.layers.selected(True), formats, tokens, **common)
    assert EMBED not in without and scores["lm_head"] == without["lm_head"]
    for fmt in formats:
        quantized = copy.deepcopy(model)
        with torch.no_grad():
            quantized.model.embed_tokens.weight.copy_(
                fmt.quantize_weight(model.model.embed_tokens.weight)
            )
        measured = kl_per_token(model, quantized, tokens)
        assert 0.3 < scores[EMBED][fmt.name] / measured < 3, (fmt.name, scores[EMBED], measured)
    with pytest.raises(BitplanError, match="cannot score a token embedding"):
        bitplan.search(untied_loaded, "q4_0,q8_0", [6], scorer="delta-loss", include_head=True)


def test_an_untied_embedding_is_a_choice_of_a_gguf_plan_with_the_head(untied_loaded, tmp_path):
    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False)
    options = "q3_k,q4_0,q5_k,q8_0"
    plans = bitplan.search(untied_loaded, options, [4, 8], include_head=True, **settings).plans
    # a choice like any other: not the cheapest at 4 bits, the best at 8
    assert plans[0].layer_formats[EMBED] != "q3_k" and plans[1].layer_formats[EMBED] == "q8_0"
    weights = sum(layer.params for layer in untied_loaded.layers)
    weights += untied_loaded.layers.embeddings[0].params
    for plan in plans:  # the budget counts the embedding
        bits = sum(
            parse_format(fmt).weight_bits(shape_of(untied_loaded, name))
            for name, fmt in plan.layer_formats.items()
        )
        assert bits / weights == pytest.approx(plan.avg_bits)
    assert (
        EMBED not in bitplan.search(untied_loaded, options, [6], **settings).plans[0].layer_formats
    )
    served = bitplan.search(untied_loaded, "w4g32,w8g32", [6], include_head=True, **settings)
    assert EMBED not in served.plans[0].layer_formats  # only a GGUF file stores it quantized
    plan = plans[0]
    path = tmp_path / "untied.gguf"
    report = bitplan.export(untied_loaded, plan, path, "gguf")
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert stored["token_embd.weight"] == plan.layer_formats[EMBED].upper()
    assert gguf_file_bytes(untied_loaded, plan) == report.file_bytes == path.stat().st_size
    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp runs it as our model
        tokens = torch.randint(1, 320, (3, 48), generator=torch.Generator().manual_seed(0))
        kl_llama, kl_quant, _ = llama_cpp_agreement(path, untied_loaded, plan, tokens, True)
        assert kl_llama < KL_TOLERANCE and kl_llama < kl_quant / KL_RATIO
    # the torch model of the plan holds the file's embedding; a fake export reloads to it
    quantized = bitplan.quantize(untied_loaded, plan)
    stored_table = parse_format(plan.layer_formats[EMBED]).quantize_weight(
        untied_loaded.module.model.embed_tokens.weight
    )
    torch.testing.assert_close(quantized.model.embed_tokens.weight, stored_table, rtol=0, atol=0)
    bitplan.export(untied_loaded, plan, tmp_path / "fake", "fake")
    reloaded = read_export(tmp_path / "fake").module
    tokens = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, quantized(tokens).logits)


def test_an_untied_embedding_takes_no_type_that_needs_an_importance_matrix(untied_loaded):
    """llama.cpp collects no imatrix for an embedding (it is looked up, not multiplied), and
    llama-quantize refuses IQ2_XS ... without one: the plan never offers them to it."""
    settings = dict(n_samples=4, seq_len=32, dtype="float32", progress=False, include_head=True)
    result = bitplan.search(untied_loaded, "iq2_xs,q4_0,q8_0", [2.5], imatrix=True, **settings)
    assert math.isnan(result.scores.layer_scores[EMBED]["iq2_xs"])
    assert result.plans[0].layer_formats[EMBED] == "q4_0"  # the cheapest it may take
    assert result.plans[0].layer_formats["lm_head"] == "iq2_xs"
    with pytest.raises(BitplanError, match="pinned to 'iq2_xs', which it lacks"):
        bitplan.search(
            untied_loaded, "iq2_xs,q4_0", [3], imatrix=True, pins=[f"{EMBED}=iq2_xs"], **settings
        )


def shape_of(model, name: str) -> tuple[int, int]:
    return tuple(dict(model.module.named_modules())[name].weight.shape)
