"""The architecture matrix (docs/ARCHITECTURE.md, "Architectures").

For each architecture a tiny random model is built from its transformers config, saved as a
Hugging Face folder with the tiny tokenizer, and taken through the command line: ``info`` (roles
and fusion groups), ``search`` (a plan), ``quantize --format packed``, reloading the export
(bitplan's loader; transformers for the ``fake`` export, the one it can read), and the reloaded
model's logits against the fake-quantized model's. Each step is its own test, one cell of the
matrix; the steps share one folder, plan and export per architecture (module-scoped fixtures).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.model import build_layer_table, load_model
from bitplan.model.moe import unfuse_experts
from bitplan.plans import Plan
from bitplan.quantization import FakeQuantLinear, apply_plan

# Sizes every architecture shares: 2 blocks, hidden 128 (one group of 128, four MX blocks of 32).
SIZES = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
EXPERTS = {"num_experts_per_tok": 2}  # of 4 experts per block
OPTIONS, BUDGET = ("w4g128", "mxfp8"), 6  # 4.125 and 8.25 bits: the plan must mix both
CALIBRATION = ["--n-samples", "4", "--seq-len", "32"]
TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))

# (layer, role, fusion group) of one block, names relative to the block.
ATTENTION = [
    ("self_attn.q_proj", "q", "self_attn.qkv"),
    ("self_attn.k_proj", "k", "self_attn.qkv"),
    ("self_attn.v_proj", "v", "self_attn.qkv"),
    ("self_attn.o_proj", "o", "self_attn.o_proj"),
]
MLP = [
    ("mlp.gate_proj", "gate", "mlp.gate_up"),
    ("mlp.up_proj", "up", "mlp.gate_up"),
    ("mlp.down_proj", "down", "mlp.down_proj"),
]
PHI3 = [  # engines' fused projections are single Linear layers already
    ("self_attn.o_proj", "o", "self_attn.o_proj"),
    ("self_attn.qkv_proj", "qkv", "self_attn.qkv"),
    ("mlp.gate_up_proj", "gate_up", "mlp.gate_up"),
    ("mlp.down_proj", "down", "mlp.down_proj"),
]


def experts(gate: str, up: str, down: str) -> list[tuple[str, str, str]]:
    """4 experts, one fusion group per block, named as the architecture's checkpoints name them."""
    names = {"gate": gate, "up": up, "down": down}
    return [
        (f"mlp.experts.{e}.{name}", role, "mlp.experts")
        for e in range(4)
        for role, name in names.items()
    ]


@dataclass(frozen=True)
class Architecture:
    config: Callable[[int], PretrainedConfig]  # vocabulary size -> a tiny config
    block: list[tuple[str, str, str]]  # what `info` must list for every block


ARCHITECTURES = {
    "llama": Architecture(
        lambda v: LlamaConfig(vocab_size=v, head_dim=32, **SIZES), ATTENTION + MLP
    ),
    "mistral": Architecture(
        lambda v: MistralConfig(vocab_size=v, head_dim=32, sliding_window=16, **SIZES),
        ATTENTION + MLP,
    ),
    "qwen2": Architecture(  # q, k, v with biases
        lambda v: Qwen2Config(vocab_size=v, **SIZES), ATTENTION + MLP
    ),
    "qwen3": Architecture(  # q and k normalized per head
        lambda v: Qwen3Config(vocab_size=v, head_dim=32, **SIZES), ATTENTION + MLP
    ),
    "gemma3": Architecture(  # sandwich norms, tied scaled embedding, local then global attention
        lambda v: Gemma3TextConfig(
            vocab_size=v,
            head_dim=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            **SIZES,
        ),
        ATTENTION + MLP,
    ),
    "phi3": Architecture(lambda v: Phi3Config(vocab_size=v, **SIZES), PHI3),
    "qwen3_moe": Architecture(
        lambda v: Qwen3MoeConfig(
            vocab_size=v, head_dim=32, moe_intermediate_size=128, num_experts=4, **EXPERTS, **SIZES
        ),
        ATTENTION + experts("gate_proj", "up_proj", "down_proj"),
    ),
    "mixtral": Architecture(  # experts named w1, w3, w2 as in Mixtral's checkpoints
        lambda v: MixtralConfig(vocab_size=v, head_dim=32, num_local_experts=4, **EXPERTS, **SIZES),
        ATTENTION + experts("w1", "w3", "w2"),
    ),
}


def save_tiny_model(config: PretrainedConfig, tokenizer, folder: Path) -> nn.Module:
    """A random model of ``config`` saved with ``tokenizer`` as a Hugging Face folder."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def logits(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(TOKENS).logits


@pytest.fixture(scope="module", autouse=True)
def bitplan_cache(tmp_path_factory):
    """One bitplan cache for the whole matrix (the CPU's dtype benchmark is measured once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITPLAN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(arch, tiny_tokenizer, tmp_path_factory) -> Path:
    config = ARCHITECTURES[arch].config(len(tiny_tokenizer))
    folder = tmp_path_factory.mktemp(arch) / "model"
    save_tiny_model(config, tiny_tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def plan_path(folder) -> Path:
    out = folder.parent / "plans"
    options = ",".join(OPTIONS)
    argv = ["search", str(folder), "--options", options, "--avg-bits", str(BUDGET)]
    assert main([*argv, *CALIBRATION, "--out", str(out)]) == 0
    return out / f"plan_bitplan_{BUDGET}.json"


def export(folder: Path, plan_path: Path, export_format: str) -> Path:
    """``bitplan quantize`` of the model folder by the plan, into a folder beside it."""
    out = folder.parent / export_format
    argv = ["quantize", str(folder), "--plan", str(plan_path), "--format", export_format]
    assert main([*argv, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def packed(folder, plan_path) -> Path:
    return export(folder, plan_path, "packed")


@pytest.fixture(scope="module")
def fake_model(folder, plan_path) -> nn.Module:
    """The original model fake-quantized in memory by the plan: what every reload must equal."""
    return apply_plan(load_model(folder).module, Plan.load(plan_path))


def test_info(arch, folder, capsys):
    """`bitplan info --layers` lists every Linear of every block with its role and fusion group,
    and nothing else (no norm, router or embedding)."""
    assert main(["info", str(folder), "--layers", "--formats", ",".join(OPTIONS)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.")]
    listed = {(name, block, role, group) for name, block, role, _shape, group in rows}
    expected = {
        (f"model.layers.{b}.{layer}", str(b), role, f"model.layers.{b}.{group}")
        for b in range(2)
        for layer, role, group in ARCHITECTURES[arch].block
    }
    assert listed == expected and len(rows) == len(expected)
    groups = {group for *_, group in expected}
    assert f"2 decoder blocks (model.layers), {len(expected)} quantizable" in out
    assert f"{len(groups)} fusion groups" in out


def test_search(arch, folder, plan_path):
    """The plan covers every decoder layer, gives each fusion group one format, mixes both options
    and keeps to the budget."""
    plan = Plan.load(plan_path)
    table = load_model(folder).layers
    assert set(plan.layer_formats) == {layer.name for layer in table.decoder_layers()}
    for group, layers in table.groups().items():
        assert len({plan.layer_formats[layer.name] for layer in layers}) == 1, group
    assert set(plan.layer_formats.values()) == set(OPTIONS)
    assert plan.avg_bits <= BUDGET


def test_packed_export(arch, plan_path, packed):
    """Every planned layer is stored as codes and scales, not as a weight, under the format the
    plan gives it; config.json names them all."""
    plan = Plan.load(plan_path)
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"]["layers"] == plan.layer_formats
    with safe_open(packed / "model.safetensors", framework="pt") as stored:
        keys = set(stored.keys())
    for name in plan.layer_formats:
        assert {f"{name}.qweight", f"{name}.scales"} <= keys and f"{name}.weight" not in keys


def test_reload(arch, folder, plan_path, packed):
    """bitplan's loader reads the packed export back: each planned layer a FakeQuantLinear of its
    format, every other tensor (norms, embeddings, biases, routers) as it was."""
    plan = Plan.load(plan_path)
    reloaded = load_model(packed).module
    original = load_model(folder).module
    for name, fmt in plan.layer_formats.items():
        layer = reloaded.get_submodule(name)
        assert isinstance(layer, FakeQuantLinear) and layer.fmt.name == fmt
    planned = {f"{name}.weight" for name in plan.layer_formats}
    others = {k: v for k, v in original.state_dict().items() if k not in planned}
    assert others, "nothing left unquantized to compare"
    state = reloaded.state_dict()
    for key, tensor in others.items():
        assert torch.equal(state[key], tensor), key


def test_reload_in_transformers(arch, folder, plan_path, fake_model):
    """transformers cannot read the packed layout; it reads the fake export, whose weights are
    the fake model's (MoE experts are fused again by transformers' own loader, so they must be
    stored under the names its checkpoints use)."""
    fake_folder = export(folder, plan_path, "fake")
    hf = AutoModelForCausalLM.from_pretrained(fake_folder).eval()
    unfuse_experts(hf)  # to compare expert by expert
    loaded, expected = dict(hf.named_parameters()), dict(fake_model.named_parameters())
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_logits_equal(arch, folder, packed, fake_model):
    """The reloaded packed model computes exactly what the fake-quantized model computes (and the
    quantization is not a no-op)."""
    reloaded = load_model(packed).module
    assert torch.equal(logits(reloaded), logits(fake_model))
    assert not torch.allclose(logits(load_model(folder).module), logits(fake_model), atol=1e-3)


STEPS = ("info", "search", "packed_export", "reload", "reload_in_transformers", "logits_equal")


def test_the_docs_matrix_names_every_cell():
    """docs/ARCHITECTURE.md's matrix has a row per architecture naming the test of each step."""
    docs = (Path(__file__).parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    assert all(callable(globals().get(f"test_{step}")) for step in STEPS)
    table = [line for line in docs.splitlines() if line.startswith("| ")]
    for arch in ARCHITECTURES:
        (row,) = [line for line in table if f"`test_info[{arch}]`" in line]
        missing = [step for step in STEPS if f"`test_{step}[{arch}]`" not in row]
        assert not missing, (arch, missing)


# What bitplan refuses, with an error naming the architecture.


def test_experts_in_another_layout_are_refused(tmp_path, tiny_tokenizer, capsys):
    """GPT-OSS stores its experts transposed, interleaved and with biases: splitting them as
    Qwen3-MoE's would compute another function, skipping them would leave most weights out."""
    config = GptOssConfig(
        vocab_size=len(tiny_tokenizer), head_dim=32, num_local_experts=4, **EXPERTS, **SIZES
    )
    save_tiny_model(config, tiny_tokenizer, tmp_path / "gpt-oss")
    capsys.readouterr()  # transformers' own warnings about the config, not the command's
    assert main(["info", str(tmp_path / "gpt-oss")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unsupported model GptOssForCausalLM" in line and "GptOssExperts" in line


def test_a_model_without_decoder_blocks_is_refused():
    with pytest.raises(BitplanError, match="unsupported model Sequential: no list of decoder"):
        build_layer_table(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
