"""A short, stable identity of a model's weights, for keying cached scores."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """Hex digest over every parameter's name, shape and values (as bf16, so that a float32 load
    and a bf16 load of the same checkpoint agree)."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        if tensor.is_floating_point():
            tensor = tensor.detach().to(torch.bfloat16).view(torch.int16)
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
