"""Sensitivity scores on the tiny model, and fake quantization."""

from __future__ import annotations

import pytest
import torch

from bitplan.formats import parse_format
from bitplan.model.layers import build_layer_table
from bitplan.quantization import FakeQuantLinear, apply_formats
from bitplan.scoring import Scores, delta_loss_scores, fisher_scores
from bitplan.scoring.replay import next_token_loss, record_block_inputs, run_block

OPTIONS = [parse_format("mxfp4"), parse_format("mxfp8")]


@pytest.fixture()
def tokens():
    return torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(1))


def test_replaying_blocks_reproduces_the_model(tiny_model, tokens):
    """The recorded block inputs, replayed block by block, give the model's own loss."""
    record = record_block_inputs(tiny_model, tokens)
    hidden = record.hidden[0]
    for index, block in enumerate(tiny_model.model.layers):
        assert torch.allclose(hidden, record.hidden[index], atol=1e-5)
        hidden = run_block(block, hidden, record.kwargs[index])
    with torch.no_grad():
        expected = tiny_model(input_ids=tokens, labels=tokens).loss
        replayed = next_token_loss(tiny_model, hidden, tokens) / (tokens.numel() - len(tokens))
    assert torch.allclose(replayed, expected, atol=1e-5)


@pytest.mark.parametrize("form", ["diag", "token", "split"])
def test_fisher_scores_nonnegative_and_ordered(tiny_model, tokens, form):
    table = build_layer_table(tiny_model)
    layers = table.selected(include_head=True)
    scores = fisher_scores(
        tiny_model, layers, OPTIONS, tokens, batch_size=4, form=form, progress=False
    )
    assert set(scores) == {layer.name for layer in layers}
    for name, by_option in scores.items():
        assert by_option["mxfp4"] >= 0 and by_option["mxfp8"] >= 0, name
        assert by_option["mxfp4"] > by_option["mxfp8"], name


@pytest.mark.parametrize("option", ["mxfp4", "q8_0"])
@pytest.mark.parametrize("role", ["down", "k"])
def test_fisher_score_matches_first_principles_on_one_layer(tiny_model, tokens, role, option):
    """For one layer, ½ Σ G² ΔY² computed from a plain full backward pass equals the scorer's,
    also when the scorer shares one quantized input between layers (k with q and v). The
    activation error counts: MX's own, and llama.cpp's rounding of a GGUF type's input (Q8_0's
    weights are nearly exact, so most of its ΔY is that rounding)."""
    table = build_layer_table(tiny_model)
    layer = next(lay for lay in table.decoder_layers() if lay.role == role)
    group = [lay for lay in table.decoder_layers() if lay.group == layer.group]
    module = dict(tiny_model.named_modules())[layer.name]
    fmt = parse_format(option)
    saved = {}
    module.register_forward_hook(lambda m, i, o: saved.update(x=i[0].detach(), y=o))
    out = tiny_model(input_ids=tokens)
    saved["y"].retain_grad()
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    torch.nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1), reduction="sum").backward()
    grad = saved["y"].grad
    with torch.no_grad():
        delta = fmt.quantize_activation(saved["x"]) @ fmt.quantize_weight(module.weight).T
        delta -= saved["x"] @ module.weight.T
        expected = 0.5 * (grad.square() * delta.square()).sum() / (tokens.numel() - len(tokens))
    module._forward_hooks.clear()
    tiny_model.zero_grad()
    exact = fisher_scores(
        tiny_model, group, [fmt], tokens, batch_size=6, progress=False, dtype=torch.float32
    )
    assert exact[layer.name][option] == pytest.approx(float(expected), rel=1e-3)
    # The default computes in bfloat16: the same estimate to within its rounding. Rounding a
    # bfloat16 input to Q8_0 draws other rounding errors than rounding its float32 value, so
    # there the two agree only statistically.
    fast = fisher_scores(tiny_model, group, [fmt], tokens, batch_size=6, progress=False)
    rel = 0.05 if option == "mxfp4" else 0.15
    assert fast[layer.name][option] == pytest.approx(float(expected), rel=rel)
    if option == "q8_0":  # without the input's rounding the estimate would be far lower
        weight = module.weight.detach()
        weight_only = saved["x"] @ (fmt.quantize_weight(weight) - weight).T
        alone = 0.5 * (grad.square() * weight_only.square()).sum() / (tokens.numel() - len(tokens))
        assert float(alone) < 0.5 * float(expected)


def test_split_form_matches_first_principles(tiny_model, tokens):
    """The "split" form: ½ Σ G² (X·ΔWᵀ)² + ½ Σ (G·Q(W))² (Q(X) − X)², from a plain backward."""
    table = build_layer_table(tiny_model)
    layer = next(lay for lay in table.decoder_layers() if lay.role == "up")
    group = [lay for lay in table.decoder_layers() if lay.group == layer.group]
    module = dict(tiny_model.named_modules())[layer.name]
    fmt = OPTIONS[0]
    saved = {}
    handle = module.register_forward_hook(lambda m, i, o: saved.update(x=i[0].detach(), y=o))
    out = tiny_model(input_ids=tokens)
    saved["y"].retain_grad()
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    torch.nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1), reduction="sum").backward()
    handle.remove()
    tiny_model.zero_grad()
    grad, x = saved["y"].grad, saved["x"]
    with torch.no_grad():
        qweight = fmt.quantize_weight(module.weight)
        weight_part = (grad * (x @ (qweight - module.weight).T)).square().sum()
        input_part = ((grad @ qweight) * (fmt.quantize_activation(x) - x)).square().sum()
        expected = 0.5 * (weight_part + input_part) / (tokens.numel() - len(tokens))
    split = fisher_scores(
        tiny_model, group, [fmt], tokens, form="split", progress=False, dtype=torch.float32
    )
    assert split[layer.name]["mxfp4"] == pytest.approx(float(expected), rel=1e-3)


def test_delta_loss_scores_nonnegative_and_ordered(tiny_model, tokens):
    table = build_layer_table(tiny_model)
    layers = table.decoder_layers()
    scores = delta_loss_scores(tiny_model, layers, OPTIONS, tokens, batch_size=4, progress=False)
    for name, by_option in scores.items():
        assert by_option["mxfp8"] >= 0, name
        assert by_option["mxfp4"] > by_option["mxfp8"], name


def test_apply_formats_quantizes_weights_and_activations(tiny_model, tokens):
    name = "model.layers.0.mlp.down_proj"
    fmt = parse_format("mxfp4")
    original = dict(tiny_model.named_modules())[name].weight.detach().clone()
    quantized = apply_formats(tiny_model, {name: "mxfp4", "lm_head": "w4g128"})
    layer = dict(quantized.named_modules())[name]
    assert isinstance(layer, FakeQuantLinear)
    assert torch.equal(layer.weight, fmt.quantize_weight(original))
    # the original model is untouched, and its tied embedding is not quantized
    assert torch.equal(dict(tiny_model.named_modules())[name].weight, original)
    assert torch.equal(quantized.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)
    x = torch.randn(2, 5, original.shape[1])
    expected = torch.nn.functional.linear(fmt.quantize_activation(x), layer.weight)
    assert torch.equal(layer(x), expected)
    with torch.no_grad():
        assert not torch.equal(quantized(tokens).logits, tiny_model(tokens).logits)


@pytest.mark.parametrize("max_logits", [320, 5 * 320, 10**9])
def test_chunked_loss_gradient_equals_unchunked(tiny_model, tokens, max_logits):
    """The loss gradient made a few tokens at a time equals one pass over all logits."""
    from bitplan.scoring.replay import loss_gradient

    record = record_block_inputs(tiny_model, tokens)
    hidden = record.final_hidden.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(next_token_loss(tiny_model, hidden, tokens), hidden)
    chunked = loss_gradient(tiny_model, record.final_hidden, tokens, max_logits=max_logits)
    assert torch.allclose(chunked, expected, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(chunked[:, -1]) == 0  # the last position predicts nothing


def test_sampled_label_gradients_have_the_kl_hessian_as_covariance(tiny_model, tokens):
    """E[g gᵀ] of the pulled-back gradient equals Jᵀ (diag p − ppᵀ) J, the Hessian of KL(p ‖ q) with
    respect to the hidden state, for a position that predicts (and is zero at one that does
    not)."""
    from bitplan.model.logits import logits_from_hidden
    from bitplan.scoring.replay import final_norm, sampled_label_gradient

    record = record_block_inputs(tiny_model, tokens[:1, :2])
    hidden = record.final_hidden.detach()  # (1, 2, 96): position 0 predicts, 1 does not

    def logits_of(h):
        return logits_from_hidden(tiny_model, final_norm(tiny_model)(h)).float()

    with torch.no_grad():
        jacobian = torch.autograd.functional.jacobian(logits_of, hidden[0, 0])  # (320, 96)
        p = logits_of(hidden[0, 0]).softmax(-1)
        expected = jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack(
        [
            sampled_label_gradient(tiny_model, hidden, torch.rand(2, 1, generator=generator))
            for _ in range(3000)
        ]
    )
    assert torch.count_nonzero(samples[:, 0, 1]) == 0
    g = samples[:, 0, 0]
    # The diagonal (what the "diag" form uses) and the quadratic form along a few directions
    # (what the "token" form uses), to Monte Carlo precision.
    diagonal = g.square().mean(0)
    assert torch.linalg.norm(diagonal - expected.diag()) < 0.05 * torch.linalg.norm(expected.diag())
    directions = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    along = (g @ directions.T).square().mean(0)
    assert torch.allclose(
        along, torch.einsum("ki,ij,kj->k", directions, expected, directions), rtol=0.1
    )


@pytest.mark.parametrize("max_logits", [320, 5 * 320])
def test_chunked_sampled_label_gradient_equals_unchunked(tiny_model, tokens, max_logits):
    from bitplan.scoring.replay import sampled_label_gradient

    hidden = record_block_inputs(tiny_model, tokens).final_hidden
    uniforms = torch.rand(hidden.shape[0] * hidden.shape[1], 1)
    whole = sampled_label_gradient(tiny_model, hidden, uniforms, max_logits=10**9)
    chunked = sampled_label_gradient(tiny_model, hidden, uniforms, max_logits=max_logits)
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_sequence_draws_the_same_labels_on_any_rank(world):
    """torchrun's ranks (every world-th sequence) draw, sequence by sequence, the numbers one
    process draws, and one process draws each batch's from that batch's own generator."""
    from bitplan.scoring.fisher import label_uniforms

    n, batch_size, length = 7, 3, 5
    one = label_uniforms(11, range(n), n, batch_size, length).reshape(n, length)
    for rank in range(world):
        mine = label_uniforms(11, range(rank, n, world), n, batch_size, length)
        assert torch.equal(mine.reshape(-1, length), one[rank::world])
    first_batch = torch.rand(
        batch_size * length, 1, generator=torch.Generator().manual_seed(11 << 20)
    )
    assert torch.equal(one[:batch_size].reshape(-1, 1), first_batch)


def test_fisher_kl_predicts_the_measured_kl_of_a_small_error(tiny_model, tokens):
    """For a small quantization error (8-bit MX) of one layer, the sampled-label estimate is the
    second-order term of the measured KL(unquantized ‖ quantized) per predicted token."""
    table = build_layer_table(tiny_model)
    layer = next(lay for lay in table.decoder_layers() if lay.role == "down")
    fmt = parse_format("mxfp8")
    many = torch.randint(0, 320, (16, 24), generator=torch.Generator().manual_seed(2))
    predicted = fisher_scores(
        tiny_model, [layer], [fmt], many, progress=False, dtype=torch.float32, gradient="kl"
    )[layer.name][fmt.name]
    with torch.no_grad():
        base = tiny_model(many).logits[:, :-1].log_softmax(-1)
        quantized = apply_formats(tiny_model, {layer.name: fmt})
        low = quantized(many).logits[:, :-1].log_softmax(-1)
    measured = float((base.exp() * (base - low)).sum(-1).mean())
    assert predicted == pytest.approx(measured, rel=0.25)


def test_float32_and_bfloat16_scores_choose_the_same_plan(tiny_model, tokens):
    """Computing in float32 (CPUs without bfloat16) or bfloat16 picks the same formats."""
    from bitplan.plans import solve_plans

    table = build_layer_table(tiny_model)
    layers = table.decoder_layers()
    plans = {}
    for dtype in (torch.float32, torch.bfloat16):
        values = fisher_scores(tiny_model, layers, OPTIONS, tokens, progress=False, dtype=dtype)
        scores = Scores(scorer="fisher", options=[f.name for f in OPTIONS], layer_scores=values)
        plans[dtype] = solve_plans(table, OPTIONS, scores, [4.5, 5.0, 6.0], "tiny", False, False)
    for low, high in zip(plans[torch.bfloat16], plans[torch.float32], strict=True):
        assert low.layer_formats == high.layer_formats


def test_the_fisher_kl_scorer_is_cached_apart_and_repeatable(tiny_folder, tmp_path):
    """``score(..., scorer="fisher-kl")`` gives the same numbers on every run (the probes are
    seeded) and never those of the loss-gradient scorer (a separate cache key)."""
    from bitplan.model import load_model
    from bitplan.scoring import score

    model = load_model(tiny_folder)
    calib = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(5))
    first = score(model, OPTIONS, calib, scorer="fisher-kl", cache=False, progress=False)
    again = score(model, OPTIONS, calib, scorer="fisher-kl", cache=False, progress=False)
    loss = score(model, OPTIONS, calib, scorer="fisher", cache=tmp_path, progress=False)
    kl = score(model, OPTIONS, calib, scorer="fisher-kl", cache=tmp_path, progress=False)
    assert first.layer_scores == again.layer_scores
    assert kl.layer_scores == first.layer_scores and "cache_hit" not in kl.extra
    assert kl.layer_scores != loss.layer_scores
