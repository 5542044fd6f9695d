"""The unquantized tensors of an export: every tensor of the model that no planned layer
replaces, in the dtype it is stored in."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bitplan.exporters.source import ExportSource


def storage_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in bfloat16 when that is lossless (a float32 load of a bf16 checkpoint), else
    as it is: nothing unquantized is ever rounded on the way to disk."""
    tensor = tensor.detach()
    if tensor.is_floating_point() and tensor.dtype != torch.bfloat16:
        as_bf16 = tensor.to(torch.bfloat16)
        if torch.equal(as_bf16.to(tensor.dtype), tensor):
            return as_bf16
    return tensor.contiguous()


def dense_tensors(source: ExportSource, skip: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict minus the ``skip`` keys, in storage dtypes, with one copy of each shared
    (tied) parameter (loaders re-tie what the config says is tied); one tensor at a time, so
    that a streamed model's tensors are read from disk only as they are written."""
    module = source.module
    aliases: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    dropped = set()
    for names in aliases.values():
        kept = [name for name in names if name not in skip][:1]
        dropped.update(name for name in names if name not in kept)
    for key, tensor in module.state_dict().items():
        if key not in skip and key not in dropped:
            yield key, storage_tensor(source.read(key, tensor))
