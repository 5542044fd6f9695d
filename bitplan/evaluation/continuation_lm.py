"""lm-eval's ``HFLM`` with a cheaper log-likelihood: the output head only where it is scored.

lm-eval scores a multiple-choice document by the log-likelihood of each answer's tokens after
the context. ``HFLM`` computes the logits and a log-softmax over the whole vocabulary at *every*
position of every padded sequence and then keeps the few that belong to the answer. With a
large vocabulary and a small model (SmolLM2: 49,152 x 576; Gemma-3-270M: 262,144 x 640) that
output layer and the ``[batch, length, vocabulary]`` tensors it writes are most of the work.

:class:`ContinuationLM` keeps everything else of ``HFLM`` (tokenization, requests, the order
and batches of lm-eval's own ``Collator``, one forward for one-token answers sharing a context)
and only asks the model for the positions its batch scores: ``logits_to_keep``, which every
causal model in transformers takes (the model's own head, softcapping included, on those
positions). Each position's logits are what the full computation gives, up to float rounding
of a matrix product over fewer rows.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

#: One request: (context, continuation) strings, and their tokens.
Request = tuple[tuple[str, str], list[int], list[int]]


def _longest_first(request: Request) -> tuple[int, tuple[int, ...]]:
    """lm-eval's order: longest input first (padding stays small), then by tokens."""
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _same_input(request: Request) -> list[int]:
    """Requests with one input (context + all but the last answer token) share a forward."""
    return request[1] + request[2][:-1]


class ContinuationLM(HFLM):
    """``HFLM`` whose log-likelihoods compute the head only on the scored positions.

    ``quiet`` hides lm-eval's own bars ("Tokenizing inputs"); the bar of the requests scored
    here is bitplan's and stays."""

    def __init__(self, *args: Any, quiet: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if not self._takes_logits_to_keep():  # lm-eval's own way for anything else
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        order = Collator(
            requests,
            sort_fn=_longest_first,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_same_input,
        )
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="requests", leave=False)
        for chunk in order.get_batched(n=int(self.batch_size)):
            for request, context, answer, logprobs in self._score_batch(chunk):
                for request_str, tokens, cached in order.get_cache(
                    req_str=request, cxt_toks=context, cont_toks=answer, logits=logprobs
                ):
                    results.append(_answer(cached, tokens, self.device))
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, results[-1])
                    bar.update(1)
        bar.close()
        return order.get_original(results)

    def _takes_logits_to_keep(self) -> bool:
        """A causal model with fixed batches whose forward takes ``logits_to_keep``."""
        forward = inspect.signature(self.model.forward).parameters
        return (
            self.backend == "causal" and self.batch_size != "auto" and "logits_to_keep" in forward
        )

    def _score_batch(self, chunk: list[Request]) -> list[tuple[Any, list[int], list[int], Any]]:
        """Each request of ``chunk`` with the log-probabilities ``[1, answer length, vocab]``
        at its answer's positions, from one forward of the right-padded batch."""
        inputs = [(context + answer)[-(self.max_length + 1) :][:-1] for _, context, answer in chunk]
        ends = [len(tokens) for tokens in inputs]
        starts = [end - len(answer) for end, (_, _, answer) in zip(ends, chunk, strict=True)]
        batch = torch.zeros(len(inputs), max(ends), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            batch[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        first = min(starts)
        keep = torch.arange(first, max(ends), device=self.device)
        with torch.no_grad():
            logits = self.model(batch.to(self.device), logits_to_keep=keep).logits
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        return [
            (request, context, answer, logprobs[row, start - first : end - first].unsqueeze(0))
            for row, ((request, context, answer), start, end) in enumerate(
                zip(chunk, starts, ends, strict=True)
            )
        ]


def _answer(logprobs: torch.Tensor, tokens: list[int], device: Any) -> tuple[float, bool]:
    """(log-likelihood of ``tokens``, whether each is the most likely) from the
    log-probabilities ``[1, ≥ len(tokens), vocab]`` ending at the last answer token."""
    target = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0)
    scored = logprobs[:, -target.shape[1] :]
    greedy = bool((scored.argmax(dim=-1) == target).all())
    return float(torch.gather(scored, 2, target.unsqueeze(-1)).sum()), greedy
