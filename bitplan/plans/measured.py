"""Choosing between finished GGUF plans by measurement: the one whose file diverges least.

The solver's plan is the best one *under the scores*; where the scores are wrong about a model
(issue 16: Gemma-3's early blocks), a hand-made rule such as one of llama.cpp's mixes can still
be better. A search given a mix to match (``--like Q4_K_M``) therefore measures both: each plan's
GGUF values (``fake_quantize_gguf``: exactly what the file stores) run on calibration windows the
scores never saw, with each matmul's input rounded as llama.cpp's CPU kernels round it (at
higher bits that rounding is most of a file's KL), and the plan with the lower mean KL from the
unquantized model is kept. That costs two quantizations and two forward passes over a few
windows, after the search.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bitplan.data.calibration import calibration_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.model import LoadedModel
from bitplan.plans.plan import Plan

#: Calibration windows the comparison runs on, after those the scores were computed on.
CHECK_WINDOWS = 8


def check_tokens(
    model: LoadedModel,
    scored_windows: int,
    seq_len: int,
    source: str | None = None,
    windows: int = CHECK_WINDOWS,
) -> torch.Tensor:
    """``windows`` calibration windows that follow the ``scored_windows`` the scores used:
    the same text, other tokens (held-out text stays for evaluation)."""
    tokens = calibration_samples(
        model.tokenizer, n_samples=scored_windows + windows, seq_len=seq_len, source=source
    )
    return tokens[scored_windows:]


def least_divergent(
    model: LoadedModel,
    plans: Sequence[Plan],
    tokens: torch.Tensor,
    embedding_type: str | None = None,
    output_type: str | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
) -> tuple[int, list[float]]:
    """The index of the plan whose GGUF file's values diverge least from ``model`` on
    ``tokens`` (mean KL per token, nats), and each plan's KL, as llama.cpp would run the file
    (its activation rounding emulated). Float32, so that the comparison is not decided by the
    compute dtype's rounding."""
    from bitplan.quantization.gguf import fake_quantize_gguf

    base = BaseLogits.compute(model.module, tokens, compute_dtype=torch.float32)
    kls = []
    for plan in plans:
        quantized = fake_quantize_gguf(
            model, plan, embedding_type, output_type, importance, llama_cpp_activations=True
        )
        kls.append(base.compare(quantized, compute_dtype=torch.float32).kl)
        del quantized  # one quantized copy at a time
    return min(range(len(plans)), key=kls.__getitem__), kls
