"""KL divergence, top-1 agreement and perplexity of a (quantized) model against the base model.

The base model's next-token distributions on held-out token sequences are computed once
(``BaseLogits.compute``) and then compared with any number of quantized variants
(``BaseLogits.compare``), so the base model need not stay in memory.

Storage: the full log-softmax over the vocabulary, for every predicted position, in float16 by
default (top-k truncation would make the KL inexact). For SmolLM2 (vocabulary 49,152) and the
default 8 x 512 held-out tokens that is 8 x 511 x 49,152 x 2 bytes = 402 MB; pass fewer/shorter
sequences, or ``dtype=torch.float32`` for exact values at twice the size. float16 keeps about
3.3 significant digits; the stored rows are renormalised before use, so rounding adds no
first-order bias: on SmolLM2 a model compared with itself gets a KL of 3e-7 nats/token, and a
KL of 0.10 comes out within 1e-5 (relative) of the float32 value. The token sequences, the base
top-1 tokens and the base perplexity are computed in float32 and stored exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bitplan.errors import BitplanError

_FORMAT_VERSION = "1"


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
        log_probs: torch.Tensor,
        top1: torch.Tensor,
        base_nll: float,
    ) -> None:
        n, length = tokens.shape
        if log_probs.shape[:2] != (n, length - 1) or top1.shape != (n, length - 1):
            raise ValueError(
                "log_probs/top1 must be [n, seq_len - 1, (vocab)] for tokens [n, seq_len]"
            )
        self.tokens = tokens
        self.log_probs = log_probs
        self.top1 = top1
        self.base_nll = base_nll  # mean NLL of the next token under the base model

    @property
    def num_predictions(self) -> int:
        return self.top1.numel()

    @property
    def vocab_size(self) -> int:
        return self.log_probs.shape[-1]

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
    ) -> BaseLogits:
        """Run ``model`` once over ``tokens`` ``[n, seq_len]`` and keep what comparisons need.

        ``tokens`` are typically ``bitplan.data.heldout.heldout_samples(tokenizer)``.
        """
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise BitplanError(
                f"held-out tokens must be [n, seq_len >= 2], got {tuple(tokens.shape)}"
            )
        chunks, top1, nll = [], [], 0.0
        for logits, batch in _logits(model, tokens, batch_size):
            for row in range(batch.shape[0]):
                log_probs = F.log_softmax(logits[row], dim=-1)
                nll -= _target_log_prob_sum(log_probs, batch[row])
                top1.append(log_probs.argmax(-1).cpu())
                # float16 has no room for -inf arithmetic; no real log-probability is below -1e4.
                chunks.append(log_probs.clamp_min(-1e4).to(dtype).cpu())
        top1_all = torch.stack(top1)
        return cls(tokens.cpu(), torch.stack(chunks), top1_all, nll / top1_all.numel())

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

    @torch.inference_mode()
    def compare(self, model: torch.nn.Module, batch_size: int = 4) -> Divergence:
        """KL(base || model) per token, top-1 agreement and perplexity of ``model``."""
        kl_sum, kl_max, agree, nll, start = 0.0, 0.0, 0, 0.0, 0
        for logits, batch in _logits(model, self.tokens, batch_size):
            if logits.shape[-1] != self.vocab_size:
                raise BitplanError(
                    f"model vocabulary ({logits.shape[-1]}) differs from the base model's "
                    f"({self.vocab_size}); compare variants of the same model"
                )
            for row in range(batch.shape[0]):
                q = F.log_softmax(logits[row], dim=-1)
                p = self.log_probs[start + row].to(q.device, torch.float32)
                if self.log_probs.dtype != torch.float32:
                    # Renormalise rounded rows so that rounding adds no first-order bias.
                    p = F.log_softmax(p, dim=-1)
                kl = (p.exp() * (p - q)).sum(-1)
                kl_sum += kl.double().sum().item()
                kl_max = max(kl_max, kl.max().item())
                agree += (q.argmax(-1).cpu() == self.top1[start + row]).sum().item()
                nll -= _target_log_prob_sum(q, batch[row])
            start += batch.shape[0]
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
        tensors = {"tokens": self.tokens, "log_probs": self.log_probs, "top1": self.top1}
        metadata = {"bitplan_base_logits": _FORMAT_VERSION, "base_nll": repr(self.base_nll)}
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
            tensors = {k: f.get_tensor(k) for k in ("tokens", "log_probs", "top1")}
        return cls(**tensors, base_nll=float(metadata["base_nll"]))


def _target_log_prob_sum(log_probs: torch.Tensor, tokens: torch.Tensor) -> float:
    """Sum of log p(token[t+1]) over a sequence, accumulated in float64."""
    return log_probs.gather(-1, tokens[1:].unsqueeze(-1)).double().sum().item()


def _logits(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> Any:
    """Yield (float32 logits for positions 0..L-2, token batch) for consecutive batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in range(0, tokens.shape[0], batch_size):
            batch = tokens[i : i + batch_size].to(device)
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            yield logits.float(), batch
    finally:
        model.train(was_training)
