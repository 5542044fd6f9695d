"""Shared helpers: splitting the last dimension into blocks (groups), and input checks.

Every block format here (integer groups, MX, NVFP4) works on blocks of consecutive elements
along the last dimension. When that dimension is not a multiple of the block size, the last
block of each row is shorter; we zero-pad it to full size, quantize, and slice the padding off.
Zeros never change a block's absolute maximum, nor an asymmetric range that already includes 0,
so the short block gets exactly the scale its own elements call for.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from bitplan.errors import BitplanError


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Reshape ``(..., n)`` to ``(..., ceil(n / block_size), block_size)``, zero-padding the end."""
    padding = -x.shape[-1] % block_size
    if padding:
        x = F.pad(x, (0, padding))
    return x.reshape(*x.shape[:-1], -1, block_size)


def from_blocks(blocks: torch.Tensor, length: int) -> torch.Tensor:
    """Undo :func:`to_blocks`: flatten the last two dimensions and drop the padding."""
    x = blocks.reshape(*blocks.shape[:-2], -1)
    if x.shape[-1] != length:
        x = x[..., :length].contiguous()
    return x


def blocks_per_row(length: int, block_size: int) -> int:
    """Number of blocks (and so of scales) a row of ``length`` elements needs."""
    return math.ceil(length / block_size)


def check_float_tensor(x: torch.Tensor) -> None:
    """Raise :class:`BitplanError` unless ``x`` is a non-empty floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise BitplanError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise BitplanError(f"can only quantize floating-point tensors, got dtype {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise BitplanError(f"cannot quantize an empty or 0-d tensor (shape {tuple(x.shape)})")


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """Check ``x`` (see :func:`check_float_tensor`) and return it as float32, copying if needed.

    Quantizers compute in float32 whatever the input dtype, and never write into their input.
    """
    check_float_tensor(x)
    return x.float()


def check_weight_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Validate a ``(out_features, in_features)`` weight shape and return it as a tuple."""
    message = f"a weight shape is (out_features, in_features), two positive ints; got {shape!r}"
    try:
        dims = tuple(operator.index(d) for d in shape)  # accepts torch.Size and numpy ints
    except TypeError:
        raise BitplanError(message) from None
    if len(dims) != 2 or min(dims) <= 0:
        raise BitplanError(message)
    return dims
