"""KL divergence, top-1 agreement and perplexity of a (quantized) model against the base model.

The base model's next-token distributions on held-out token sequences are computed once
(``BaseLogits.compute``) and then compared with any number of quantized variants
(``BaseLogits.compare``), so the base model need not stay in memory.

Storage, exact and independent of the vocabulary's size: for a torch language model, the base
model's final hidden states (float32) and its output head; its log-probabilities are recomputed
from them, a bounded chunk of tokens at a time (``bitplan.model.logits``), whenever a variant is
compared. For SmolLM2 and the default 8 x 512 held-out tokens that is 9 MB of hidden states plus
the head (57 MB in bfloat16, the dtype its weights are exact in), where the full log-softmax would
be 402 MB in float16 (2.1 GB for Gemma-3's 262,144 tokens). Models that are not torch language
models (a llama.cpp runner) have no head to keep: their full log-softmax is stored instead, in
float16 by default (about 3.3 significant digits; rows are renormalised before use, so rounding
adds no first-order bias). Variants are always read a chunk of tokens at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bitplan.compute import autocast
from bitplan.errors import BitplanError
from bitplan.model.logits import final_hidden_states, logits_from_hidden, token_chunks

_FORMAT_VERSION = "2"  # 2: hidden states and head instead of log-probabilities


@dataclass(frozen=True)
class Divergence:
    """How far a model's next-token distributions are from the base model's."""

    #: Mean over predicted tokens of KL(base || model), in nats.
    kl: float
    #: Fraction of predicted tokens where both models' most likely token is the same.
    top1_agreement: float
    #: Perplexity of the model on the held-out tokens.
    ppl: float
    #: Perplexity of the base model on the same tokens.
    base_ppl: float
    #: Number of predicted tokens averaged over.
    tokens: int
    #: Largest per-token KL seen (a hint of outliers the mean hides).
    kl_max: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class BaseLogits:
    """The base model's next-token log-probabilities on fixed held-out sequences."""

    def __init__(
        self,
        tokens: torch.Tensor,
        top1: torch.Tensor,
        base_nll: float,
        log_probs: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        head: dict[str, torch.Tensor] | None = None,
        softcap: float | None = None,
    ) -> None:
        n, length = tokens.shape
        if top1.shape != (n, length - 1):
            raise ValueError("top1 must be [n, seq_len - 1] for tokens [n, seq_len]")
        if (log_probs is None) == (hidden is None or head is None):
            raise ValueError("give either log_probs, or hidden and head")
        stored = log_probs if log_probs is not None else hidden
        if stored.shape[:2] != (n, length - 1):
            raise ValueError("log_probs/hidden must be [n, seq_len - 1, ...]")
        self.tokens = tokens
        self.top1 = top1
        self.base_nll = base_nll  # mean NLL of the next token under the base model
        self.log_probs = log_probs  # [n, seq_len - 1, vocab], or None when the head is kept
        self.hidden = hidden  # [n, seq_len - 1, width]: what the base model's head reads
        self.head = head  # {"weight": [vocab, width], "bias": [vocab] (optional)}
        self.softcap = softcap

    @property
    def num_predictions(self) -> int:
        return self.top1.numel()

    @property
    def vocab_size(self) -> int:
        stored = self.log_probs if self.log_probs is not None else self.head["weight"]
        return stored.shape[-1] if self.log_probs is not None else stored.shape[0]

    @property
    def base_ppl(self) -> float:
        return math.exp(self.base_nll)

    @classmethod
    @torch.inference_mode()
    def compute(
        cls,
        model: torch.nn.Module,
        tokens: torch.Tensor,
        batch_size: int = 4,
        dtype: torch.dtype = torch.float16,
        compute_dtype: torch.dtype = torch.float32,
    ) -> BaseLogits:
        """Run ``model`` once over ``tokens`` ``[n, seq_len]`` and keep what comparisons need.

        ``tokens`` are typically ``bitplan.data.heldout.heldout_samples(tokenizer)``. ``dtype``
        is the storage of the log-probabilities of a model without a head to keep (a llama.cpp
        runner); a torch language model keeps its hidden states and head, exactly.
        ``compute_dtype`` is what the model runs in (autocast; ``bitplan.compute``).
        """
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise BitplanError(
                f"held-out tokens must be [n, seq_len >= 2], got {tuple(tokens.shape)}"
            )
        tokens = tokens.cpu()
        if _has_head(model):
            hidden = torch.cat(
                [
                    h.float().cpu()
                    for h, _ in _hidden_states(model, tokens, batch_size, compute_dtype)
                ]
            )
            head_module = model.get_output_embeddings()
            head = {"weight": _exact_compact(head_module.weight)}
            if getattr(head_module, "bias", None) is not None:
                head["bias"] = head_module.bias.detach().float().clone()
            softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
            base = cls(
                tokens,
                torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.long),
                0.0,
                hidden=hidden,
                head=head,
                softcap=softcap or None,
            )
            chunks = base._base_chunks(compute_dtype)
        else:
            base, chunks = None, _logit_chunks(model, tokens, batch_size, compute_dtype)
        top1 = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.long)
        stored: list[list[torch.Tensor]] = [[] for _ in range(tokens.shape[0])]
        nll = 0.0
        for row, part, logits in chunks:
            log_probs = F.log_softmax(logits, dim=-1)
            nll -= _target_log_prob_sum(log_probs, tokens[row, 1:][part])
            top1[row, part] = log_probs.argmax(-1).cpu()
            if base is None:
                # float16 has no room for -inf arithmetic; no real log-probability is below -1e4.
                stored[row].append(log_probs.clamp_min(-1e4).to(dtype).cpu())
        nll /= top1.numel()
        if base is not None:
            base.top1, base.base_nll = top1, nll
            return base
        log_probs = torch.stack([torch.cat(parts) for parts in stored])
        return cls(tokens, top1, nll, log_probs=log_probs)

    @classmethod
    def on_heldout(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        n_samples: int = 8,
        seq_len: int = 512,
        batch_size: int = 4,
        dtype: torch.dtype = torch.float16,
    ) -> BaseLogits:
        """``compute`` on bitplan's held-out text (``bitplan.data.heldout``), never calibration."""
        from bitplan.data.heldout import heldout_samples

        tokens = heldout_samples(tokenizer, n_samples=n_samples, seq_len=seq_len)
        return cls.compute(model, tokens, batch_size=batch_size, dtype=dtype)

    def _base_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, slice, torch.Tensor]]:
        """The base model's logits (or stored log-probs) as float32, chunk by chunk, in the same
        chunks as ``_logit_chunks`` reads a variant's; the head runs under autocast to
        ``dtype`` as a variant's does, so that a model compared with itself gets exactly 0."""
        if self.log_probs is not None:
            for row in range(self.log_probs.shape[0]):
                for part in token_chunks(self.log_probs.shape[1], self.vocab_size):
                    yield row, part, self.log_probs[row, part].float()
            return
        weight = self.head["weight"].to(dtype)  # once per pass: bounded by the head's own size
        bias = self.head.get("bias")
        for row in range(self.hidden.shape[0]):
            for part in token_chunks(self.hidden.shape[1], self.vocab_size):
                with autocast("cpu", dtype):
                    logits = F.linear(self.hidden[row, part], weight, bias).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                yield row, part, logits

    @torch.inference_mode()
    def compare(
        self,
        model: torch.nn.Module,
        batch_size: int = 4,
        compute_dtype: torch.dtype = torch.float32,
    ) -> Divergence:
        """KL(base || model) per token, top-1 agreement and perplexity of ``model`` (run in
        ``compute_dtype``)."""
        kl_sum, kl_max, agree, nll = 0.0, 0.0, 0, 0.0
        variant = _logit_chunks(model, self.tokens, batch_size, compute_dtype)
        for (row, part, logits), (base_row, base_part, base) in zip(
            variant, self._base_chunks(compute_dtype), strict=False
        ):
            if logits.shape[-1] != self.vocab_size:
                raise BitplanError(
                    f"model vocabulary ({logits.shape[-1]}) differs from the base model's "
                    f"({self.vocab_size}); compare variants of the same model"
                )
            assert (row, part) == (base_row, base_part)
            q = F.log_softmax(logits, dim=-1)
            # Stored float16 rows are renormalised so that rounding adds no first-order bias.
            p = F.log_softmax(base.to(q.device), dim=-1)
            kl = (p.exp() * (p - q)).sum(-1)
            kl_sum += kl.double().sum().item()
            kl_max = max(kl_max, kl.max().item())
            agree += (q.argmax(-1).cpu() == self.top1[row, part]).sum().item()
            nll -= _target_log_prob_sum(q, self.tokens[row, 1:][part])
        n = self.num_predictions
        return Divergence(
            kl=kl_sum / n,
            top1_agreement=agree / n,
            ppl=math.exp(nll / n),
            base_ppl=self.base_ppl,
            tokens=n,
            kl_max=kl_max,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (written to a temporary name first, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"tokens": self.tokens, "top1": self.top1}
        if self.log_probs is not None:
            tensors["log_probs"] = self.log_probs
        else:
            tensors["hidden"] = self.hidden
            tensors.update({f"head.{k}": v for k, v in self.head.items()})
        metadata = {"bitplan_base_logits": _FORMAT_VERSION, "base_nll": repr(self.base_nll)}
        if self.softcap:
            metadata["softcap"] = repr(self.softcap)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BaseLogits:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise BitplanError(f"base logits file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("bitplan_base_logits") != _FORMAT_VERSION:
                raise BitplanError(
                    f"{path} is not a bitplan base-logits file (format {_FORMAT_VERSION})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
        softcap = float(metadata["softcap"]) if "softcap" in metadata else None
        return cls(
            tensors["tokens"],
            tensors["top1"],
            float(metadata["base_nll"]),
            log_probs=tensors.get("log_probs"),
            hidden=tensors.get("hidden"),
            head=head or None,
            softcap=softcap,
        )


def _target_log_prob_sum(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of log p(target) over positions (rows of ``log_probs``), accumulated in float64."""
    targets = targets.to(log_probs.device)
    return log_probs.gather(-1, targets.unsqueeze(-1)).double().sum().item()


def _has_head(model: torch.nn.Module) -> bool:
    """A torch language model whose decoder and output head can be run apart."""
    return (
        hasattr(model, "get_decoder")
        and hasattr(model, "get_output_embeddings")
        and model.get_output_embeddings() is not None
    )


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hidden_states(
    model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, dtype: torch.dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (final hidden states for positions 0..L-2, token batch) for consecutive batches."""
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, tokens.shape[0], batch_size):
            batch = tokens[i : i + batch_size].to(device)
            with autocast(device, dtype):
                hidden = final_hidden_states(model, batch[:, :-1])
            yield hidden, batch
    finally:
        model.train(was_training)


def _logit_chunks(
    model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, dtype: torch.dtype
) -> Iterator[tuple[int, slice, torch.Tensor]]:
    """Yield (sequence, positions, float32 logits of those positions), in chunks of at most
    ``LOGITS_PER_CHUNK`` logits for a torch language model. Any other model (a llama.cpp runner)
    is called for whole batches of logits, then read in the same chunks."""
    length = tokens.shape[1] - 1
    if _has_head(model):
        vocab = model.get_output_embeddings().weight.shape[0]
        start = 0
        for hidden, batch in _hidden_states(model, tokens, batch_size, dtype):
            for row in range(batch.shape[0]):
                for part in token_chunks(length, vocab):
                    with autocast(hidden.device, dtype):
                        logits = logits_from_hidden(model, hidden[row, part])
                    yield start + row, part, logits.float()
            start += batch.shape[0]
        return
    device = _device(model)
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size].to(device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        for row in range(batch.shape[0]):
            for part in token_chunks(length, logits.shape[-1]):
                yield i + row, part, logits[row, part].float()


def _exact_compact(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` in bfloat16 when that holds it exactly (weights that came from a
    bfloat16 checkpoint), else in float32."""
    weight = weight.detach().float()
    compact = weight.to(torch.bfloat16)
    return compact if torch.equal(compact.float(), weight) else weight.clone()
