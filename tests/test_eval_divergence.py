"""KL divergence / top-1 agreement / perplexity against stored base-model log-probabilities."""

from __future__ import annotations

import copy

import pytest
import torch

from bitplan.data.heldout import heldout_samples
from bitplan.errors import BitplanError
from bitplan.evaluation.divergence import BaseLogits


@pytest.fixture()
def tokens(tiny_tokenizer):
    return heldout_samples(tiny_tokenizer, n_samples=3, seq_len=48)


def _perturbed(model, scale: float, seed: int = 0):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in other.modules():
            if isinstance(module, torch.nn.Linear):
                noise = torch.randn(module.weight.shape, generator=generator)
                module.weight.add_(noise * module.weight.std() * scale)
    return other


def test_model_against_itself_is_zero(tiny_model, tokens):
    exact = BaseLogits.compute(tiny_model, tokens, batch_size=2, dtype=torch.float32)
    same = exact.compare(tiny_model)
    assert same.kl == 0.0 and same.kl_max == 0.0
    assert same.top1_agreement == 1.0
    assert same.ppl == same.base_ppl
    assert same.tokens == 3 * 47
    # float16 storage (the default) rounds the log-probabilities: zero up to rounding.
    rounded = BaseLogits.compute(tiny_model, tokens).compare(tiny_model)
    assert 0.0 <= rounded.kl < 1e-5 and rounded.top1_agreement == 1.0


def test_kl_grows_with_weight_perturbation(tiny_model, tokens):
    base = BaseLogits.compute(tiny_model, tokens)
    results = [base.compare(_perturbed(tiny_model, s)) for s in (0.02, 0.1, 0.5)]
    kls = [r.kl for r in results]
    assert 1e-5 < kls[0] < kls[1] < kls[2]
    assert results[2].top1_agreement < 1.0
    assert all(r.base_ppl == base.base_ppl for r in results)
    assert results[2].ppl != base.base_ppl


class _LogitsOnly(torch.nn.Module):
    """A model that only hands out whole logits, like the llama.cpp runner."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("runner", [False, True])
def test_save_load_round_trip(tmp_path, tiny_model, tiny_tokenizer, runner):
    source = _LogitsOnly(tiny_model) if runner else tiny_model
    base = BaseLogits.on_heldout(source, tiny_tokenizer, n_samples=2, seq_len=40)
    assert base.tokens.shape == (2, 40)
    if runner:  # no head to keep: the log-probabilities themselves, in float16
        assert base.log_probs.dtype == torch.float16 and base.hidden is None
    else:  # the hidden states and the head, nothing vocabulary-sized per token
        assert base.log_probs is None and base.hidden.shape == (2, 39, 96)
        assert torch.equal(base.head["weight"].float(), tiny_model.lm_head.weight)
    path = tmp_path / "base.safetensors"
    base.save(path)
    loaded = BaseLogits.load(path)
    other = _perturbed(tiny_model, 0.1)
    assert loaded.compare(other) == base.compare(other)
    with pytest.raises(BitplanError, match="does not exist"):
        BaseLogits.load(tmp_path / "missing.safetensors")


def test_chunked_kl_equals_whole_logits(tiny_model, tokens, monkeypatch):
    """KL, agreement and perplexity read a few tokens at a time equal those of whole logits."""
    other = _perturbed(tiny_model, 0.1)
    with torch.no_grad():
        p = torch.log_softmax(tiny_model(input_ids=tokens[:, :-1]).logits, -1)
        q = torch.log_softmax(other(input_ids=tokens[:, :-1]).logits, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    nll = -q.gather(-1, tokens[:, 1:].unsqueeze(-1)).double().mean()
    import bitplan.model.logits as logits_module

    for chunk in (10**9, 7 * 320, 320):  # everything at once; 7 tokens; one token at a time
        monkeypatch.setattr(logits_module, "LOGITS_PER_CHUNK", chunk)
        monkeypatch.setattr(
            "bitplan.evaluation.divergence.token_chunks",
            lambda n, v, _c=chunk: logits_module.token_chunks(n, v, _c),
        )
        result = BaseLogits.compute(tiny_model, tokens).compare(other)
        # float32 matmuls over other row blocks round differently: KL (a small difference of
        # large terms) agrees to about 1e-5.
        assert result.kl == pytest.approx(kl.mean().item(), rel=1e-4)
        assert result.kl_max == pytest.approx(kl.max().item(), rel=1e-4)
        agreement = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
        assert result.top1_agreement == pytest.approx(agreement, rel=1e-12)
        assert result.ppl == pytest.approx(torch.exp(nll).item(), rel=1e-6)


def test_different_vocabulary_is_refused(tiny_model, tokens):
    from conftest import build_tiny_llama

    base = BaseLogits.compute(tiny_model, tokens)
    with pytest.raises(BitplanError, match="vocabulary"):
        base.compare(build_tiny_llama(vocab_size=base.vocab_size + 8))
