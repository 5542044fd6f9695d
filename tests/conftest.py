"""Shared fixtures: a tiny Llama model built from a config in memory, with a tokenizer trained in
memory, so that most tests need no file and no network."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bitplan.model.loading import LoadedModel

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A model is quantized layer by layer under a budget of average bits.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Question: which answer is correct? Answer: the first one.",
] * 4


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab <= 320) trained on a few sentences."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_tiny_llama(vocab_size: int = 320, seed: int = 0) -> LlamaForCausalLM:
    """Two blocks, hidden 96 (not a multiple of 64 or 128, like SmolLM2's 576), 3 heads / 1 KV head."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer) -> LlamaForCausalLM:
    return build_tiny_llama(vocab_size=len(tiny_tokenizer))


@pytest.fixture()
def tiny(tiny_model, tiny_tokenizer) -> LoadedModel:
    """The tiny model as bitplan's loader returns a model (an export's or a scorer's input)."""
    return LoadedModel(module=tiny_model, tokenizer=tiny_tokenizer, name="tiny", source="memory")


@pytest.fixture()
def tiny_folder(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    """The tiny model and tokenizer saved as a Hugging Face folder, with the bitplan cache in
    ``tmp_path / "cache"``: what the command line reads."""
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
