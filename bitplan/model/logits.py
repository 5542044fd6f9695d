"""Next-token logits a bounded chunk of tokens at a time.

A model's logits are (tokens x vocabulary): with the 150k-260k vocabularies of Qwen-3, Llama-3
or Gemma-3, a batch of 4 x 512 tokens is already 2 GB of float32, and the log-softmax and its
gradient need that again. Everything that needs logits (the loss gradient of the scorers, the KL
of the evaluators) runs the decoder once for its final hidden states, then the output head over
chunks of at most ``LOGITS_PER_CHUNK`` logits: memory stays bounded and time linear in tokens.
The final norm and the head act on each token alone, so chunking over tokens is exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

#: The most logits (tokens x vocabulary) held at once: 64 MB in float32.
LOGITS_PER_CHUNK = 1 << 24


def token_chunks(
    n_tokens: int, vocab_size: int, max_logits: int = LOGITS_PER_CHUNK
) -> Iterator[slice]:
    """Consecutive slices of ``range(n_tokens)`` with at most ``max_logits`` logits each."""
    step = max(1, max_logits // max(1, vocab_size))
    for start in range(0, n_tokens, step):
        yield slice(start, min(start + step, n_tokens))


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output head on final (already normalised) hidden states, with the model's logit
    soft-capping where its config asks for it (Gemma-2 style)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's output for ``input_ids`` after its final norm: what the head reads."""
    decoder = model.get_decoder()
    return decoder(input_ids=input_ids, use_cache=False).last_hidden_state
