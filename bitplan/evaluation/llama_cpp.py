"""A GGUF file run by llama.cpp, shaped like a causal LM so that bitplan's evaluators measure it:
KL divergence and perplexity as llama.cpp computes them (needs ``llama-cpp-python``)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from bitplan.errors import BitplanError


class LlamaCppModel(nn.Module):
    """A GGUF file run by llama.cpp (``llama-cpp-python``), shaped like a causal LM for
    bitplan's evaluators: ``model(input_ids=...)`` returns an object with ``.logits``
    (float32, one row per position), so ``bitplan.evaluation.divergence.BaseLogits.compare``
    measures KL and perplexity as llama.cpp computes them."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None):
        super().__init__()
        try:
            import llama_cpp
        except ImportError as err:
            raise BitplanError(
                "running a GGUF needs llama-cpp-python (pip install llama-cpp-python==0.3.36)"
            ) from err
        self.path = Path(path)
        self.n_ctx = n_ctx
        self._llm = llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=min(n_ctx, 512),
            logits_all=True,
            n_threads=n_threads or max(1, min(4, os.cpu_count() or 1)),
            verbose=False,
        )
        # Evaluators look up a parameter for the device.
        self._device_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        rows = []
        for sequence in input_ids.tolist():
            if len(sequence) > self.n_ctx:
                raise BitplanError(f"sequence of {len(sequence)} tokens > n_ctx {self.n_ctx}")
            self._llm.reset()
            self._llm.eval(sequence)
            rows.append(torch.from_numpy(np.array(self._llm.scores[: len(sequence)], np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))

    def close(self) -> None:
        self._llm.close()
