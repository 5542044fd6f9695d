"""Where bitplan keeps converted models, scores and machine measurements between runs."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bitplan.errors import BitplanError

#: What the cache holds, by folder: what each kind is, for ``bitplan cache list``.
KINDS = {
    "models": "models converted from .gguf files (bf16 folders) and assembled bundled files",
    "scores": "layer scores of past searches",
    "base_logits": "unquantized models' logits on held-out text",
    "machine": "this machine's measurements (compute dtype)",
}


def cache_dir() -> Path:
    """``$BITPLAN_CACHE``, default ``~/.cache/bitplan``."""
    return Path(os.environ.get("BITPLAN_CACHE", Path.home() / ".cache" / "bitplan"))


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # a key of KINDS
    path: Path
    size: int  # bytes, everything below path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_entries(kinds: list[str] | None = None) -> list[CacheEntry]:
    """Everything in the cache of ``kinds`` (default all), by kind then name."""
    entries = []
    for kind in check_kinds(kinds):
        folder = cache_dir() / kind
        if folder.is_dir():
            entries += [CacheEntry(kind, p, _size(p)) for p in sorted(folder.iterdir())]
    return entries


def check_kinds(kinds: list[str] | None) -> list[str]:
    """``kinds``, or all of them; raises BitplanError naming the known ones for another."""
    unknown = [k for k in kinds or [] if k not in KINDS]
    if unknown:
        raise BitplanError(f"no cache kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    return list(kinds or KINDS)


def clear_cache(kinds: list[str] | None = None) -> list[CacheEntry]:
    """Delete everything of ``kinds`` (default all) from the cache; what was deleted."""
    entries = cache_entries(kinds)
    for entry in entries:
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink()
    return entries
