"""The interface every number format implements.

A format knows how to quantize-dequantize ("fake-quantize") a weight tensor, and an activation
tensor if it quantizes activations, and exactly how many bits a weight of a given shape costs
on disk. A format also owns its storage: ``encode`` splits a weight into the parts bitplan's
packed layout stores (codes, scales, zero points; ``storage.py``), ``decode`` rebuilds the
weight from them, and the fake quantization is ``decode(encode(w))``. It knows nothing about
models.

Weights are 2-D, shaped (out_features, in_features) as in ``torch.nn.Linear``; groups and blocks
always run along the input dimension (the last one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from bitplan.formats.storage import no_packed_layout


class Format(ABC):
    """A quantization format. Subclasses are small frozen dataclasses."""

    #: Canonical lower-case name, e.g. ``"mxfp4"`` or ``"w4g128"``;
    #: ``bitplan.formats.parse_format(name)`` returns an equal format.
    name: str

    #: True when the format also quantizes the layer's input activations (MX, NVFP4, W8A8 ...).
    quantizes_activations: bool = False
    #: True when the format cannot be quantized without an importance matrix (llama.cpp's
    #: lowest-bit i-quants).
    requires_importance: bool = False

    def requires_importance_for(self, row_length: int) -> bool:
        """Whether rows of ``row_length`` weights need an importance matrix in this format
        (a llama.cpp type may fall back to one that needs none)."""
        return self.requires_importance

    @abstractmethod
    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the quantize-dequantized weight: same shape and dtype as ``weight``."""

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize an activation tensor ``(..., in_features)``; identity by default."""
        return x

    @abstractmethod
    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        """Exact number of bits that storing a weight of ``shape`` costs.

        With ``include_scales=False`` only the element bits are counted (scales, zero points and
        tensor-level scales left out), as the reference's tables do.
        """

    def part_bits(self, shape: tuple[int, int]) -> dict[str, int]:
        """Exact bits of each stored part of a weight of ``shape``, by part name; they add up to
        ``weight_bits(shape)``. Raises :class:`BitplanError` for a format with no packed layout."""
        raise no_packed_layout(self)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored parts of the 2-D ``weight`` quantized with this format (``storage.py``)."""
        raise no_packed_layout(self)

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The float32 weight of ``shape`` that ``parts`` (from :meth:`encode`) store; equal to
        ``quantize_weight(w.float())`` bit for bit."""
        raise no_packed_layout(self)

    def bits_per_weight(self, shape: tuple[int, int], include_scales: bool = True) -> float:
        """Average bits per weight element for a weight of ``shape``."""
        return self.weight_bits(shape, include_scales) / (shape[0] * shape[1])

    def __str__(self) -> str:
        return self.name
