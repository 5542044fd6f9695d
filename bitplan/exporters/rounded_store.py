"""Rounded weights kept on disk until an export stores them: what GPTQ and tuning give a streamed
model, block by block (``quantization.sequential.gptq_streamed``).

A streamed model (``bitplan.model.streaming``) holds one block's weights at a time; its rounded
codes and scales cannot all stay in memory either. ``RoundedStore`` writes each block's
``RoundedWeight``s to a safetensors file of their own as they are made and reads one back when
an export asks for it, so the export stores them as they are (``ExportSource.rounded``).

Elements are kept in bfloat16, which holds every element of a format of at most 8 bits exactly
(integer codes up to 256 in size, FP8/FP6/FP4 values: at most 4 significant bits).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bitplan.formats.block_scaled import BlockScales, RoundedWeight

_PARTS = ("scale", "zero_point", "global_scale")


class RoundedFacts(NamedTuple):
    """What an export checks of a rounded weight before it stores it: known without reading
    its elements back from a ``RoundedStore``."""

    block_size: int
    method: str
    row_length: int


def rounded_facts(rounded: Mapping[str, RoundedWeight]) -> dict[str, RoundedFacts]:
    """Layer name -> the facts of each rounded weight; a ``RoundedStore``'s from memory (each
    weight is then read from disk once, when the export stores it)."""
    if isinstance(rounded, RoundedStore):
        return dict(rounded.facts)
    return {
        name: RoundedFacts(weight.block_size, weight.method, weight.elements.shape[-1])
        for name, weight in rounded.items()
    }


class RoundedStore(Mapping[str, RoundedWeight]):
    """Layer name -> ``RoundedWeight``, one safetensors file per ``add`` in ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file_of: dict[str, Path] = {}
        self.facts: dict[str, RoundedFacts] = {}

    def add(self, weights: Mapping[str, RoundedWeight]) -> None:
        """Write ``weights`` (one block's) to a new file; they are read back on demand."""
        if not weights:
            return
        tensors, metadata = {}, {}
        for name, weight in weights.items():
            elements = weight.elements.to(torch.bfloat16)
            if not torch.equal(elements.float(), weight.elements.float()):
                raise ValueError(f"{name}: elements that bfloat16 cannot hold exactly")
            tensors[f"{name}.elements"] = elements.contiguous()
            for part in _PARTS:
                value = getattr(weight.scales, part)
                if value is not None:
                    tensors[f"{name}.{part}"] = value.contiguous()
            metadata[name] = f"{weight.block_size} {weight.method}"
        path = self.folder / f"block-{len(set(self._file_of.values())):05d}.safetensors"
        save_file(tensors, path, metadata=metadata)
        self._file_of.update(dict.fromkeys(weights, path))
        self.facts.update(rounded_facts(weights))

    def __getitem__(self, name: str) -> RoundedWeight:
        path = self._file_of[name]
        with safe_open(path, framework="pt") as f:
            block_size, method = f.metadata()[name].split()
            present = set(f.keys())
            parts = {
                part: f.get_tensor(f"{name}.{part}") if f"{name}.{part}" in present else None
                for part in _PARTS
            }
            elements = f.get_tensor(f"{name}.elements").float()
        return RoundedWeight(elements, BlockScales(**parts), int(block_size), method)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)
