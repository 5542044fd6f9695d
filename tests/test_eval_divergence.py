"""KL divergence / top-1 agreement / perplexity against stored base-model log-probabilities."""

from __future__ import annotations

import copy

import pytest
import torch

from bitplan.data.heldout import heldout_samples
from bitplan.errors import BitplanError
from bitplan.evaluate.divergence import BaseLogits


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


def test_save_load_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    base = BaseLogits.on_heldout(tiny_model, tiny_tokenizer, n_samples=2, seq_len=40)
    assert base.tokens.shape == (2, 40) and base.log_probs.dtype == torch.float16
    path = tmp_path / "base.safetensors"
    base.save(path)
    loaded = BaseLogits.load(path)
    other = _perturbed(tiny_model, 0.1)
    assert loaded.compare(other) == base.compare(other)
    with pytest.raises(BitplanError, match="does not exist"):
        BaseLogits.load(tmp_path / "missing.safetensors")


def test_different_vocabulary_is_refused(tiny_model, tokens):
    from conftest import build_tiny_llama

    base = BaseLogits.compute(tiny_model, tokens)
    with pytest.raises(BitplanError, match="vocabulary"):
        base.compare(build_tiny_llama(vocab_size=base.vocab_size + 8))
