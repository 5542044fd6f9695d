"""The GGUF export of every architecture it writes, checked in llama.cpp (docs/GGUF.md,
"Architectures").

For each one, a tiny random model of its config in tests/test_architectures.py (Gemma-3's with
what llama.cpp's gemma3 fixes, see ``llama_cpp_config``), its matrices scaled so that its logits
are peaked, is exported with a plan mixing legacy quants, k-quants (stored as their fallbacks on
rows of 128) and float types. Then:

* the file holds the layout: the names of the ``gguf`` package's map for the architecture, the
  types, the values (q / k rows permuted for llama and mistral, Gemma's norms plus one);
* llama.cpp (llama-cpp-python) loads it, and its logits match bitplan's fake-quantized model with
  llama.cpp's activation rounding emulated (``KL_TOLERANCE``, ``KL_RATIO``).

Mixture-of-experts models, and configs llama.cpp would compute otherwise, are refused with a
one-line BitplanError.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_gguf_export
import torch
from test_architectures import ARCHITECTURES, save_tiny_model
from test_gguf_export import assert_file_holds_the_layout, llama_cpp_agreement, make_peaked
from transformers import PretrainedConfig

from bitplan.errors import BitplanError
from bitplan.exporters import export_model
from bitplan.exporters.gguf_architectures import ARCHITECTURES as GGUF_ARCHITECTURES
from bitplan.exporters.gguf_architectures import exact_tokens, gguf_architecture
from bitplan.model.loading import LoadedModel
from bitplan.plans import plan_from_formats, uniform_gguf_plan
from bitplan.serving import GGUF_MODEL_TYPES

# test_gguf_export's fixtures: llama-cpp-python (skips without it), the tokenizer's GGUF.
llama_cpp = test_gguf_export.llama_cpp
tokenizer_gguf = test_gguf_export.tokenizer_gguf

#: The matrix: tests/test_architectures.py's name -> the GGUF architecture llama.cpp reads.
GGUF_ARCHS = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "phi3": "phi3",
}
#: Cycled over the decoder layers: every family llama.cpp computes differently.
KINDS = ["q8_0", "q4_0", "q5_1", "q4_k", "q6_k", "gguf:bf16", "f16"]
#: Mean KL(bitplan's fake-quantized model, llama.cpp's activation rounding emulated || llama.cpp)
#: per token. Measured 2e-5 (gemma3) to 5e-4 (phi3): llama.cpp keeps K and V in f16, which the
#: emulation does not. It must also stay well below what quantizing the weights costs (measured
#: 60x to 110x below).
KL_TOLERANCE = 1e-3
KL_RATIO = 30
TOKENS = torch.randint(1, 300, (3, 48), generator=torch.Generator().manual_seed(0))


def llama_cpp_config(arch: str, vocab_size: int) -> PretrainedConfig:
    """tests/test_architectures.py's tiny config; Gemma-3's with what llama.cpp's gemma3 fixes
    (every sixth layer global, attention scaled by 1/sqrt(head_dim)) and, as in Gemma-3-1B and
    larger, a linearly scaled rope in the global layers."""
    config = ARCHITECTURES[arch].config(vocab_size)
    if arch == "gemma3":
        config.num_hidden_layers = 6
        config.layer_types = ["sliding_attention"] * 5 + ["full_attention"]
        config.query_pre_attn_scalar = config.head_dim
        config.rope_parameters["full_attention"].update(rope_type="linear", factor=8.0)
    return config


def tiny_model(config: PretrainedConfig, tokenizer, folder) -> LoadedModel:
    module = make_peaked(save_tiny_model(config, tokenizer, folder))
    return LoadedModel(module=module, tokenizer=tokenizer, name=config.model_type, source="-")


@pytest.fixture(scope="module", params=list(GGUF_ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(arch, tiny_tokenizer, tmp_path_factory) -> LoadedModel:
    config = llama_cpp_config(arch, len(tiny_tokenizer))
    return tiny_model(config, tiny_tokenizer, tmp_path_factory.mktemp(arch))


@pytest.fixture(scope="module")
def plan(model):
    layers = model.layers.decoder_layers()
    formats = {layer.name: KINDS[i % len(KINDS)] for i, layer in enumerate(layers)}
    return plan_from_formats(model, formats, "architecture mix", model_id=model.name)


@pytest.fixture(scope="module")
def exported(model, plan, tokenizer_gguf, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"{model.name}.gguf"
    return path, export_model(model, plan, path, "gguf", metadata_from=tokenizer_gguf)


def test_every_supported_architecture_is_in_the_matrix(tiny_tokenizer):
    """serving's list (what --serve llama.cpp accepts) is the writer's registry, and each entry
    is checked in llama.cpp below."""
    assert set(GGUF_MODEL_TYPES) == set(GGUF_ARCHITECTURES)
    tested = {llama_cpp_config(arch, 300).model_type for arch in GGUF_ARCHS}
    assert tested == set(GGUF_MODEL_TYPES)


def test_the_docs_table_lists_every_architecture():
    docs = (Path(__file__).parent.parent / "docs" / "GGUF.md").read_text()
    section = docs.split("## Architectures")[1].split("\n## ")[0]
    for model_type, arch in GGUF_ARCHITECTURES.items():
        assert f"| `{model_type}` | `{arch.name}`" in section, model_type


def test_the_file_holds_the_architecture(arch, model, plan, exported):
    path, report = exported
    reader = assert_file_holds_the_layout(path, model, plan)
    name = GGUF_ARCHS[arch]
    config = model.module.config
    assert reader.fields["general.architecture"].contents() == name
    assert reader.fields[f"{name}.block_count"].contents() == config.num_hidden_layers
    assert {"Q8_0", "Q4_0", "Q5_1", "BF16", "F16"} <= set(report.type_counts)
    names = {t.name for t in reader.tensors}
    assert all(t in names for t in ("blk.0.attn_output.weight", "blk.1.ffn_down.weight"))
    # Mistral's sliding window is not llama.cpp's llama: the export says up to where they agree.
    window = exact_tokens(config, gguf_architecture(config))
    assert window == (16 if arch == "mistral" else None)
    assert (report.notes == []) if window is None else (f"up to {window} tokens" in report.notes[0])


def test_llama_cpp_computes_the_models_logits(arch, llama_cpp, model, plan, exported):
    path, _ = exported
    config = model.module.config
    length = exact_tokens(config, gguf_architecture(config)) or TOKENS.shape[1]
    tokens = TOKENS[:, :length]
    kl_llama, kl_quant, top1 = llama_cpp_agreement(path, model, plan, tokens, emulate=True)
    assert kl_llama < KL_TOLERANCE
    assert kl_llama < kl_quant / KL_RATIO
    assert top1 > 0.95


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_mixture_of_experts_models_are_refused(arch, tiny_tokenizer, tmp_path):
    """Refused for what they are, before anything else (here: no GGUF to copy a tokenizer from)."""
    model = tiny_model(ARCHITECTURES[arch].config(len(tiny_tokenizer)), tiny_tokenizer, tmp_path)
    plan = uniform_gguf_plan(model, "q8_0", model_id=arch)
    path = tmp_path / "moe.gguf"
    with pytest.raises(BitplanError, match=f"not '{arch}'") as refused:
        export_model(model, plan, path, "gguf")
    assert "\n" not in str(refused.value) and not path.exists()


def _yarn(config: PretrainedConfig) -> None:
    config.rope_parameters.update(rope_type="yarn", factor=4.0)


def _local_rope(config: PretrainedConfig) -> None:
    config.query_pre_attn_scalar = config.head_dim
    config.rope_parameters["sliding_attention"]["rope_theta"] = 2e4


@pytest.mark.parametrize(
    ("arch", "change", "reason"),
    [
        ("gemma3", None, "query_pre_attn_scalar is 256"),  # test_architectures.py's own config
        ("gemma3", _local_rope, "local layers with base 10000"),
        ("llama", _yarn, "'yarn' rope scaling"),
    ],
)
def test_configs_llama_cpp_computes_otherwise_are_refused(arch, change, reason):
    config = ARCHITECTURES[arch].config(300)
    if change is not None:
        change(config)
    with pytest.raises(BitplanError, match=reason) as refused:
        gguf_architecture(config)
    assert "\n" not in str(refused.value)
