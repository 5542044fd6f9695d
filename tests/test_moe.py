"""Mixture-of-experts: experts as Linear layers, grouped per block, scored, planned, quantized."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from bitplan.errors import BitplanError
from bitplan.formats import parse_format
from bitplan.model.layers import build_layer_table, expert_index
from bitplan.model.moe import UnfusedExperts, unfuse_experts
from bitplan.plans import solve_plans
from bitplan.quantization import FakeQuantLinear, apply_plan
from bitplan.scoring.fisher import fisher_scores
from bitplan.scoring.scores import Scores

OPTIONS = [parse_format("w2g32"), parse_format("w4g32")]


@pytest.fixture()
def moe_model():
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config).eval()


def test_unfused_experts_compute_the_same_function(moe_model):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = moe_model(ids).logits
        assert unfuse_experts(moe_model) == 2
        after = moe_model(ids).logits
    assert isinstance(moe_model.model.layers[0].mlp.experts, UnfusedExperts)
    # separate gate and up matmuls may round differently from the fused one, nothing more
    assert torch.allclose(before, after, atol=1e-6, rtol=0)


def test_layer_table_groups_experts(moe_model):
    unfuse_experts(moe_model)
    groups = build_layer_table(moe_model).groups()
    experts = groups["model.layers.0.mlp.experts"]
    assert len(experts) == 4 * 3 and {layer.role for layer in experts} == {"gate", "up", "down"}
    by_kind = build_layer_table(moe_model, expert_grouping="kind").groups()
    assert len(by_kind["model.layers.1.mlp.experts.gate_up"]) == 8
    assert len(by_kind["model.layers.1.mlp.experts.down"]) == 4


def _never_route_to(expert: int, router) -> None:
    """Make a router never pick ``expert`` (for the test of unrouted experts)."""

    def forward(hidden):
        hidden = hidden.reshape(-1, router.hidden_dim)
        logits = torch.nn.functional.linear(hidden, router.weight)
        logits[:, expert] = float("-inf")
        probs = logits.softmax(dim=-1)
        values, indices = probs.topk(router.top_k, dim=-1)
        return logits, values / values.sum(dim=-1, keepdim=True), indices

    router.forward = forward


def test_search_and_fake_quantization_respect_expert_groups(moe_model):
    unfuse_experts(moe_model)
    for layer in moe_model.model.layers:
        _never_route_to(3, layer.mlp.gate)
    table = build_layer_table(moe_model)
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="2 expert\\(s\\) .*never routed"):
        values = fisher_scores(
            moe_model, table.decoder_layers(), OPTIONS, tokens, batch_size=2, progress=False
        )
    # the unrouted expert gets the mean of its block's routed experts, per projection
    for block in (0, 1):
        prefix = f"model.layers.{block}.mlp.experts"
        routed = [values[f"{prefix}.{e}.down_proj"]["w2g32"] for e in range(3)]
        assert values[f"{prefix}.3.down_proj"]["w2g32"] == pytest.approx(sum(routed) / 3)
        assert all(v > 0 for v in routed)

    scores = Scores("fisher", [f.name for f in OPTIONS], values)
    (plan,) = solve_plans(table, OPTIONS, scores, [3.0], "tiny-moe", include_scales=False)
    quantized = apply_plan(moe_model, plan)
    for group, layers in table.groups().items():
        assert len({plan.layer_formats[layer.name] for layer in layers}) == 1, group
    experts = [layer for layer in table.decoder_layers() if expert_index(layer.name) is not None]
    for layer in experts:
        module = quantized.get_submodule(layer.name)
        assert isinstance(module, FakeQuantLinear)
        assert module.fmt.name == plan.layer_formats[layer.name]
    with torch.no_grad():
        assert torch.isfinite(quantized(tokens).logits).all()


def test_unfused_experts_keep_the_models_dtype(moe_model):
    moe_model.to(torch.bfloat16)
    unfuse_experts(moe_model)
    expert = moe_model.model.layers[0].mlp.experts[0]
    assert expert.gate_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():  # float32 experts in a bfloat16 model would not multiply
        assert moe_model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("flag", "value"), [("is_transposed", True), ("has_bias", True), ("is_concatenated", False)]
)
def test_experts_layouts_that_cannot_be_split_are_refused(moe_model, flag, value):
    """transformers marks other expert layouts on the module; splitting them as gate rows then up
    rows of experts x 2I x H would compute another function."""
    setattr(moe_model.model.layers[1].mlp.experts, flag, value)
    with pytest.raises(BitplanError, match=f"unsupported model Qwen3MoeForCausalLM: .*{flag}"):
        unfuse_experts(moe_model)
