"""Where bitplan keeps converted models, scores and machine measurements between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$BITPLAN_CACHE``, default ``~/.cache/bitplan``."""
    return Path(os.environ.get("BITPLAN_CACHE", Path.home() / ".cache" / "bitplan"))
