"""Bit packing of low-bit codes (element codes and zero points of bitplan's packed layout).

Packing is a dense little-endian bit stream: code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the
stream, byte ``k`` holds stream bits ``[8k, 8k+8)``, least significant bit first. ``n`` codes of
``b`` bits take exactly ``ceil(n*b/8)`` bytes; only the last byte can carry padding (zeros).
What the codes mean is the formats' business (minifloat codes: ``minifloat.py``).
"""

from __future__ import annotations

import math

import torch

from bitplan.errors import BitplanError

_CODES_PER_WORD = 8  # 8 codes of b <= 8 bits fill exactly b bytes


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed."""
    return math.ceil(count * bits / 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise BitplanError(f"can only pack codes of 1 to 8 bits, not {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (any shape, each < 2**bits) into a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise BitplanError(f"codes out of range for {bits}-bit packing")
    count = flat.numel()
    flat = torch.nn.functional.pad(flat, (0, -count % _CODES_PER_WORD))
    # Eight b-bit codes make one 8b-bit word (at most 64 bits), which is b whole bytes.
    shifts = torch.arange(_CODES_PER_WORD, dtype=torch.int64) * bits
    words = (flat.view(-1, _CODES_PER_WORD) << shifts).sum(dim=1, dtype=torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_nbytes(count, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, as a 1-D int64 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise BitplanError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype}")
    if packed.numel() != packed_nbytes(count, bits):
        raise BitplanError(
            f"{packed.numel()} packed bytes do not hold {count} codes of {bits} bits "
            f"(expected {packed_nbytes(count, bits)})"
        )
    data = packed.to(torch.int64)
    data = torch.nn.functional.pad(data, (0, -data.numel() % bits))
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (data.view(-1, bits) << byte_shifts).sum(dim=1, dtype=torch.int64)
    shifts = torch.arange(_CODES_PER_WORD, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count]
