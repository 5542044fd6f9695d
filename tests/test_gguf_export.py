"""Writing plans as GGUF files, llama.cpp's mixes as plans, and checks against llama.cpp itself.

A tiny llama (hidden 256, so that the k-quants apply) with the conftest BPE tokenizer written as
GGUF tokenizer metadata. The llama.cpp tests need ``llama-cpp-python`` (the set-up builds it)
and are skipped without it:

* its C quantizer (``ggml_quantize_chunk``, which bitplan calls through ctypes when it is
  installed) writes the same bytes as bitplan's numpy port for every type the port has, with
  and without an importance matrix;
* llama.cpp loads bitplan's file and its logits match bitplan's fake-quantized model.

llama.cpp's mixes and the i-quants, file against file: ``tests/test_gguf_mixes.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from bitplan.errors import BitplanError
from bitplan.evaluation.llama_cpp import LlamaCppModel
from bitplan.exporters import export_model
from bitplan.exporters.gguf import gguf_size
from bitplan.exporters.gguf_layout import gguf_layout
from bitplan.formats.ggml_quantizer import ggml_quantize_rows
from bitplan.formats.gguf import PORTED_TYPES, port_quantize_rows, quantize_rows
from bitplan.model.loading import LoadedModel
from bitplan.plans import (
    llama_cpp_mix_plan,
    mix_layer_type,
    plan_from_formats,
    solve_gguf_plans,
    uniform_gguf_plan,
)
from bitplan.quantization.gguf import fake_quantize_gguf
from bitplan.scoring import score
from bitplan.scoring.importance import collect_importance

HIDDEN, HEADS, KV_HEADS = 256, 4, 2


def write_tokenizer_gguf(path: Path, tokenizer) -> Path:
    """A GGUF holding only tokenizer metadata (gpt2-style BPE) for the conftest tokenizer."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("bitplan tiny test model")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def build_gguf_llama(
    vocab_size: int,
    tied: bool = True,
    seed: int = 0,
    *,
    hidden: int = HIDDEN,
    intermediate: int = 512,
    blocks: int = 2,
    kv_heads: int = KV_HEADS,
) -> LoadedModel:
    """By default two blocks, hidden 256 (k-quants fit), weights scaled up so that logits are
    peaked."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        head_dim=hidden // HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    module = make_peaked(LlamaForCausalLM(config).eval())
    return LoadedModel(module=module, tokenizer=None, name="tiny-gguf", source="/nonexistent")


@torch.no_grad()
def make_peaked(module: nn.Module) -> nn.Module:
    """Scale a random model's matrices up so that its logits are peaked (llama.cpp's small
    differences, and quantization's, then show in KL), and jitter norms and biases so that they
    matter (and wrong offsets or orders show)."""
    for name, param in module.named_parameters():
        if param.dim() == 2:
            param.mul_(10.0 if "embed" in name or "lm_head" in name else 3.0)
        else:
            param.add_(0.1 * torch.randn_like(param))
    return module


@pytest.fixture(scope="module")
def tokenizer_gguf(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_tokenizer_gguf(tmp_path_factory.mktemp("gguf") / "tokenizer.gguf", tiny_tokenizer)


@pytest.fixture(scope="module")
def gguf_model(tiny_tokenizer) -> LoadedModel:
    return build_gguf_llama(len(tiny_tokenizer))


@pytest.fixture(scope="module")
def mixed_plan(gguf_model):
    """Every type family in one plan (k-quants, legacy, MXFP4, BF16)."""
    kinds = ["q4_k", "q6_k", "q2_k", "q3_k", "q5_k", "q8_0", "q4_0", "q5_1", "gguf:mxfp4"]
    layers = gguf_model.layers.decoder_layers()
    formats = {layer.name: kinds[i % len(kinds)] for i, layer in enumerate(layers)}
    formats[layers[-1].name] = "gguf:bf16"
    return plan_from_formats(gguf_model, formats, "test mix", model_id="tiny")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gguf_model, mixed_plan, tokenizer_gguf):
    path = tmp_path_factory.mktemp("out") / "tiny.gguf"
    report = export_model(gguf_model, mixed_plan, path, "gguf", metadata_from=tokenizer_gguf)
    return path, report


# ---------------------------------------------------------------- the file


def assert_file_holds_the_layout(path: Path, model: LoadedModel, plan) -> gguf.GGUFReader:
    """Every tensor of the file has its layout's name and type, and holds the fake-quantized
    model's values (in llama.cpp's rotary row order, plus the layout's offset); returns the
    reader."""
    reader = gguf.GGUFReader(path)
    layout = {t.name: t for t in gguf_layout(model, plan)}
    fake = dict(fake_quantize_gguf(model, plan).named_parameters())
    assert {t.name for t in reader.tensors} == set(layout)
    for tensor in reader.tensors:
        planned = layout[tensor.name]
        assert tensor.tensor_type.name == planned.type_name
        values = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
        expected = fake[planned.parameter].detach() + planned.offset
        if planned.heads is not None:  # llama.cpp's rotary row order
            rows = expected.shape[0]
            expected = expected.reshape(planned.heads, 2, rows // planned.heads // 2, -1)
            expected = expected.swapaxes(1, 2).reshape(rows, -1)
        np.testing.assert_array_equal(values.reshape(expected.shape), expected.numpy())
    return reader


def test_file_holds_the_plans_types_and_values(exported, gguf_model, mixed_plan):
    path, _ = exported
    reader = assert_file_holds_the_layout(path, gguf_model, mixed_plan)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["llama.block_count"].contents() == 2
    assert "general.file_type" not in reader.fields
    assert json.loads(reader.fields["bitplan.plan"].contents())["recipe"] == "test mix"


def test_sizes_match_the_plans_accounting(exported, gguf_model, mixed_plan):
    path, report = exported
    reader = gguf.GGUFReader(path)
    assert report.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    # The file is the header and metadata, then the tensors, each padded to the alignment.
    alignment = 32
    padded = sum(math.ceil(int(t.n_bytes) / alignment) * alignment for t in reader.tensors)
    assert report.file_bytes == path.stat().st_size == reader.data_offset + padded
    # The planned layers cost exactly what the plan says.
    assert report.plan_bits == mixed_plan.avg_bits * report.planned_params
    assert report.planned_bits_per_weight == pytest.approx(mixed_plan.avg_bits)
    assert gguf_size(gguf_model, mixed_plan).tensor_bytes == report.tensor_bytes
    assert report.bits_per_weight == report.tensor_bytes * 8 / report.params
    assert "bits per weight" in report.summary()


def test_transformers_reads_the_file_back_to_the_same_model(exported, gguf_model, mixed_plan):
    """transformers' GGUF loader undoes llama.cpp's q/k row order: its logits must be ours."""
    from transformers import AutoModelForCausalLM

    path, _ = exported
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    fake = fake_quantize_gguf(gguf_model, mixed_plan)
    tokens = torch.randint(0, gguf_model.module.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, fake(tokens).logits, rtol=1e-4, atol=1e-4)


def test_untied_head_and_embedding_defaults(tiny_tokenizer, tokenizer_gguf, tmp_path):
    model = build_gguf_llama(len(tiny_tokenizer), tied=False)
    plan = uniform_gguf_plan(model, "q4_k", model_id="tiny")
    layout = {t.name: t.type_name for t in gguf_layout(model, plan)}
    assert layout["token_embd.weight"] == "Q4_K" and layout["output.weight"] == "Q6_K"
    layout = {t.name: t.type_name for t in gguf_layout(model, plan, "q8_0", "q5_k")}
    assert layout["token_embd.weight"] == "Q8_0" and layout["output.weight"] == "Q5_K"
    report = export_model(
        model, plan, tmp_path / "untied.gguf", "gguf", metadata_from=tokenizer_gguf
    )
    assert report.output_type == "Q6_K"


def test_refusals_leave_nothing_behind(gguf_model, mixed_plan, tokenizer_gguf, tmp_path):
    with pytest.raises(BitplanError, match="Hugging Face folder"):
        export_model(gguf_model, mixed_plan, tmp_path / "a.gguf", "gguf")
    with pytest.raises(BitplanError, match="ending in .gguf"):
        export_model(
            gguf_model, mixed_plan, tmp_path / "a.bin", "gguf", metadata_from=tokenizer_gguf
        )
    wrong = plan_from_formats(
        gguf_model, dict.fromkeys(mixed_plan.layer_formats, "w4g128"), "x", model_id="tiny"
    )
    with pytest.raises(BitplanError, match="cannot hold"):
        export_model(gguf_model, wrong, tmp_path / "b.gguf", "gguf", metadata_from=tokenizer_gguf)
    existing = tmp_path / "c.gguf"
    existing.write_text("keep me")
    with pytest.raises(BitplanError, match="exists"):
        export_model(gguf_model, mixed_plan, existing, "gguf", metadata_from=tokenizer_gguf)
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"]


def test_importance_reaches_the_file(gguf_model, tokenizer_gguf, tmp_path):
    plan = uniform_gguf_plan(gguf_model, "q4_k", model_id="tiny")
    tokens = torch.randint(0, gguf_model.module.config.vocab_size, (2, 16))
    importance = collect_importance(gguf_model, tokens)
    path = tmp_path / "imatrix.gguf"
    export_model(
        gguf_model, plan, path, "gguf", importance=importance, metadata_from=tokenizer_gguf
    )
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    layer = "model.layers.1.mlp.down_proj"
    weight = dict(gguf_model.module.named_modules())[layer].weight.detach().numpy()
    expected = quantize_rows(weight, "Q4_K", importance[layer])
    np.testing.assert_array_equal(stored["blk.1.ffn_down.weight"], expected)
    assert not np.array_equal(expected, quantize_rows(weight, "Q4_K"))
    fake = fake_quantize_gguf(gguf_model, plan, importance=importance)
    np.testing.assert_array_equal(
        dict(fake.named_modules())[layer].weight.detach().numpy(),
        gguf.quants.dequantize(expected, gguf.GGMLQuantizationType.Q4_K),
    )


# ---------------------------------------------------------------- llama.cpp's mixes


def test_q4_k_m_rule_on_smollm2_shapes():
    """SmolLM2-135M: 30 blocks, 9 / 3 heads. attn_v and ffn_down are promoted in 14 blocks."""
    promoted = [i for i in range(30) if mix_layer_type("Q4_K_M", "v", i, 30, 3) == "q6_k"]
    assert promoted == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert mix_layer_type("Q4_K_M", "down", 5, 30, 3) == "q6_k"
    assert mix_layer_type("Q4_K_M", "down", 6, 30, 3) == "q4_k"
    assert mix_layer_type("Q4_K_M", "q", 0, 30, 3) == "q4_k"
    assert mix_layer_type("Q3_K_M", "v", 1, 30, 3) == "q5_k"
    assert mix_layer_type("Q3_K_M", "down", 0, 30, 3) == "q5_k"  # i < 30 // 16
    assert mix_layer_type("Q3_K_M", "down", 1, 30, 3) == "q4_k"
    assert mix_layer_type("Q3_K_M", "o", 9, 30, 3) == "q4_k"
    assert mix_layer_type("Q2_K", "v", 9, 30, 3) == "q3_k"
    assert mix_layer_type("Q2_K", "v", 9, 32, 4) == "q4_k"


def test_mix_plan_and_ungrouped_table(gguf_model):
    plan = llama_cpp_mix_plan(gguf_model, "Q4_K_M", model_id="tiny")
    assert plan.recipe == "llama.cpp Q4_K_M"
    v = [plan.layer_formats[f"model.layers.{i}.self_attn.v_proj"] for i in range(2)]
    assert v == ["q4_k", "q6_k"]  # n = 2 blocks: 7n/8 = 1, so block 1 is promoted
    table = gguf_model.layers.ungrouped()
    assert len(table.groups()) == len(gguf_model.layers.decoder_layers())
    with pytest.raises(BitplanError, match="unknown llama.cpp mix"):
        llama_cpp_mix_plan(gguf_model, "Q4_K_X")


def test_collect_importance(gguf_model):
    tokens = torch.randint(0, gguf_model.module.config.vocab_size, (2, 16))
    importance = collect_importance(gguf_model, tokens)
    q = "model.layers.0.self_attn.q_proj"
    assert importance[q].shape == (HIDDEN,) and (importance[q] > 0).all()
    np.testing.assert_allclose(importance[q], importance["model.layers.0.self_attn.k_proj"])


# ---------------------------------------------------------------- llama.cpp itself


def test_i_quants_as_scored_plan_options(llama_cpp, gguf_model, tokenizer_gguf, tmp_path):
    """``bitplan search --options iq4_xs,iq3_s,q4_k``: the scorers quantize every option with
    ``quantize_weight`` and no imatrix, the solver mixes the i-quants in, the file holds them.
    An option that llama.cpp refuses without an imatrix (iq2_xs) is refused, saying so."""
    options = ["iq4_xs", "iq3_s", "q4_k"]
    tokens = torch.randint(0, gguf_model.module.config.vocab_size, (2, 16))
    scores = score(gguf_model, options, tokens, cache=False, progress=False)
    for layer_scores in scores.layer_scores.values():
        assert all(math.isfinite(v) and v >= 0 for v in layer_scores.values())
    total = {o: sum(s[o] for s in scores.layer_scores.values()) for o in options}
    assert total["iq3_s"] > total["iq4_xs"]  # fewer bits, more loss
    plan = solve_gguf_plans(gguf_model, options, scores, [4.0])[0]
    assert {"iq4_xs", "iq3_s"} <= set(plan.layer_formats.values())
    path = tmp_path / "iquants.gguf"
    export_model(gguf_model, plan, path, "gguf", metadata_from=tokenizer_gguf)
    stored = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {"IQ4_XS", "IQ3_S"} <= stored
    with pytest.raises(BitplanError, match="IQ2_XS needs an importance matrix"):
        score(gguf_model, ["iq2_xs", "q4_k"], tokens, cache=False, progress=False)


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


PORT_TYPES = sorted(PORTED_TYPES)


@pytest.mark.parametrize("type_name", PORT_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_port_equals_llama_cpps_quantizer(llama_cpp, type_name, with_imatrix):
    """bitplan's numpy port writes the bytes of llama.cpp's own ggml_quantize_chunk (which
    bitplan itself uses when llama-cpp-python is installed)."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((40, 512)) * 0.02).astype(np.float32)
    x[0, :40] = 0
    x[1] *= 1e-6
    x[2, 100:300] = np.abs(x[2, 100:300])
    x[3, ::17] *= 25
    x[4, :64] = np.float32(0.01) * rng.integers(-8, 8, 64)
    x[5] = rng.standard_t(2, 512).astype(np.float32) * 0.01  # heavy tails
    imatrix = (rng.lognormal(0, 1.5, 512) ** 2).astype(np.float32) if with_imatrix else None
    ours = port_quantize_rows(x, type_name, imatrix)
    np.testing.assert_array_equal(ours, ggml_quantize_rows(x, type_name, imatrix))
    np.testing.assert_array_equal(ours, quantize_rows(x, type_name, imatrix))


def test_activation_rounding_emulation(gguf_model, mixed_plan):
    """``llama_cpp_activations`` rounds each Linear's input as llama.cpp's matmul would: Q8_0
    blocks are exactly Q8_0's quantize-dequantize (ties aside)."""
    from bitplan.formats.gguf_activations import round_q8_0, round_q8_k

    x = torch.randn(3, 512) * 4
    q8_0 = quantize_rows(x.numpy(), "Q8_0")
    expected = gguf.quants.dequantize(q8_0, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(round_q8_0(x).numpy(), expected)
    rounded = round_q8_k(x).reshape(3, 2, 256)
    steps = rounded / rounded.abs().amax(-1, keepdim=True) * 127
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    plain = fake_quantize_gguf(gguf_model, mixed_plan)
    emulated = fake_quantize_gguf(gguf_model, mixed_plan, llama_cpp_activations=True)
    tokens = torch.randint(0, gguf_model.module.config.vocab_size, (1, 12))
    with torch.no_grad():
        a, b = plain(tokens).logits, emulated(tokens).logits
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0.1, atol=0.5)


#: Mean KL(bitplan's fake-quantized model || llama.cpp) per token that still counts as "the
#: same model" on this deliberately peaked tiny model (entropy ~2 nats). The weights are
#: bit-identical (tests above); what remains is llama.cpp's CPU matmuls rounding activations to
#: 8 bits (Q8_0 / Q8_K blocks) for quantized weights. It must also stay far below the KL that
#: quantizing the weights causes.
KL_TOLERANCE = 5e-3
KL_RATIO = 20


def kl_per_token(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def llama_cpp_agreement(
    path: Path, model: LoadedModel, plan, tokens: torch.Tensor, emulate: bool = False
) -> tuple[float, float, float]:
    """How llama.cpp running ``path`` agrees with bitplan's fake-quantized model of ``plan`` on
    ``tokens`` (with llama.cpp's activation rounding emulated if ``emulate``): KL(fake ||
    llama.cpp) and KL(unquantized || fake) per token, and top-1 agreement."""
    fake = fake_quantize_gguf(model, plan, llama_cpp_activations=emulate)
    runner = LlamaCppModel(path, n_ctx=64, n_threads=2)
    with torch.no_grad():
        ours = torch.log_softmax(fake(tokens).logits, -1)
        theirs = torch.log_softmax(runner(input_ids=tokens).logits, -1)
        base = torch.log_softmax(model.module(tokens).logits, -1)
    runner.close()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return kl_per_token(ours, theirs), kl_per_token(base, ours), top1


def test_llama_cpp_runs_the_file_and_matches_our_model(llama_cpp, exported, gguf_model, mixed_plan):
    path, _ = exported
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, gguf_model.module.config.vocab_size, (3, 48), generator=generator)
    kl_llama, kl_quant, top1 = llama_cpp_agreement(path, gguf_model, mixed_plan, tokens)
    assert kl_llama < KL_TOLERANCE
    assert kl_llama < kl_quant / KL_RATIO
    assert top1 > 0.95


def test_a_gguf_is_converted_once_into_the_cache(exported, tmp_path, monkeypatch, capsys):
    """The first load of a .gguf converts it into a bf16 folder keyed by the file's content;
    later loads (and a copy of the file elsewhere) read that folder; a changed file converts
    anew."""
    import shutil

    import bitplan.model.loading as loading
    from bitplan.model import load_model

    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    path, _ = exported
    first = load_model(path)
    assert "converting tiny.gguf once" in capsys.readouterr().out
    assert first.source_gguf() == path
    folders = list((tmp_path / "cache" / "models").iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()

    def no_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(loading, "convert_gguf_to_folder", no_conversion)
    copy = tmp_path / "elsewhere" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    again = load_model(copy)
    tokens = torch.randint(0, first.module.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(again.module(tokens).logits, first.module(tokens).logits)
    assert again.identity == first.identity

    with copy.open("r+b") as f:  # another file under the same name: converted anew
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(AssertionError, match="converted twice"):
        load_model(copy)
