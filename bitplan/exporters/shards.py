"""Writing an export's tensors as safetensors shards, one bounded piece at a time.

A writer that collected every tensor before saving would hold the whole quantized model in
memory; ``ShardWriter`` saves a shard as soon as it holds ``max_bytes``, so an export of a
streamed model (weights read from disk one tensor at a time) never needs more than one shard
in memory. One shard is named ``model.safetensors``; several are named the Hugging Face way
(``model-00001-of-00003.safetensors``) with a ``model.safetensors.index.json`` that
transformers, vLLM and bitplan's own loaders read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: The weight file of a one-shard export.
WEIGHTS_FILE = "model.safetensors"
#: The index of a sharded export (tensor name -> shard file).
INDEX_FILE = "model.safetensors.index.json"
#: Default largest shard: small enough to hold in memory beside one block, large enough that
#: small models get a single file.
DEFAULT_SHARD_BYTES = 2 * 2**30


class ShardWriter:
    """Collects tensors and saves them into shards of at most ``max_bytes`` (one tensor larger
    than that gets a shard of its own)."""

    def __init__(
        self, folder: Path, metadata: dict[str, str], max_bytes: int = DEFAULT_SHARD_BYTES
    ):
        self.folder, self.metadata, self.max_bytes = Path(folder), metadata, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names of every saved shard
        self.dtypes: dict[str, torch.dtype] = {}  # every tensor's dtype, for the config

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.dtypes:
            raise ValueError(f"tensor {key} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._save()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.dtypes[key] = tensor.dtype

    def add_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Add (name, tensor) pairs in order, e.g. a model's unquantized tensors."""
        for key, tensor in items:
            self.add(key, tensor)

    def _save(self) -> None:
        save_file(self.pending, self._temporary_name(len(self.shards)), metadata=self.metadata)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _temporary_name(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.safetensors.part"

    def finish(self) -> list[Path]:
        """Save what is pending, give the shards their final names; returns the files."""
        if self.pending or not self.shards:
            self._save()
        count = len(self.shards)
        if count == 1:
            final = [self.folder / WEIGHTS_FILE]
        else:
            final = [
                self.folder / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
            ]
        for index, path in enumerate(final):
            self._temporary_name(index).rename(path)
        if count > 1:
            weight_map = {
                key: path.name
                for keys, path in zip(self.shards, final, strict=True)
                for key in keys
            }
            total = sum(path.stat().st_size for path in final)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an export (or any Hugging Face folder), in shard order."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"].values()
        return [folder / name for name in sorted(set(names))]
    return [folder / WEIGHTS_FILE]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export's weight file(s), by name."""
    tensors = {}
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
            tensors.update({name: f.get_tensor(name) for name in names})
    return tensors
