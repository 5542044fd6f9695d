"""A short, stable identity of a model's weights, for keying cached scores."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn


def model_fingerprint(model: nn.Module, read: Callable[[str], torch.Tensor] | None = None) -> str:
    """Hex digest over every parameter's name, shape and values (as bf16, so that a float32 load
    and a bf16 load of the same checkpoint agree). ``read(name)`` supplies the values of tensors
    still on the meta device (a streamed model's blocks), one at a time."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            if read is None:
                raise ValueError(f"{name} is on the meta device: pass read= to fingerprint it")
            tensor = read(name)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        if tensor.is_floating_point():
            tensor = tensor.detach().to(torch.bfloat16).view(torch.int16)
        digest.update(tensor.contiguous().cpu().numpy().data)  # no extra copy of the bytes
    return digest.hexdigest()
