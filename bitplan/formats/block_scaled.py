"""The block-scaled core: integer groups, MX, NVFP4 and FP8 are one algorithm.

Each row is cut into blocks along its last dimension (``blocks.py``; FP8's block is the whole
row). Then, as in microxcaling, with GPTQ's split of ``find_params`` from ``quantize``:

1. ``fmt.find_scales(blocks)`` chooses every block's scales (:class:`BlockScales`);
2. ``fmt.round(x, scales)`` rounds values onto the element grid with those scales: integer
   codes or minifloat values. It works element by element, so any ``x`` that broadcasts against
   the scales works, e.g. one column of each group (what tuned rounding needs);
3. ``scales.dequantize(elements)`` multiplies back.

The fake quantizer is these three steps. ``encode`` stores the elements' codes and the scales
(``storage.py``); ``decode`` reads them back and runs the same step 3, so that
``decode(encode(w)) == quantize_weight(w)`` bit for bit without running the slow bit packing on
every fake quantization.

A family defines its block size, its scale rule and rounding (the element type), and how its
codes and scales are stored: :class:`MinifloatBlockFormat` below for MX, NVFP4 and FP8;
``integer.IntegerWeights`` for the integer formats.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitplan.formats.base import Format
from bitplan.formats.blocks import as_float32, from_blocks, to_blocks
from bitplan.formats.minifloat import (
    MinifloatSpec,
    codes_to_minifloat,
    minifloat_to_codes,
    quantize_to_minifloat,
)
from bitplan.formats.packing import pack_bits, unpack_bits
from bitplan.formats.storage import check_parts


def nonzero_or_one(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with 1 where it is 0: what values are divided by. Blocks whose scale is 0 then
    round to finite codes and dequantize to ``code * 0 = 0``, never NaN. (Scales are signed
    in the full-range integer rule.)"""
    return torch.where(scale != 0, scale, torch.ones_like(scale))


@dataclass(frozen=True, eq=False)  # tensors: compare their fields, not the object
class BlockScales:
    """The scales of every block, shaped ``(..., blocks, 1)`` to broadcast over its elements.

    ``scale`` is float32 (holding values of the stored scale type). ``zero_point`` is the integer
    code of 0 per block (asymmetric integer formats; None otherwise). ``global_scale`` is a 0-d
    float32 that multiplies every block scale (NVFP4; None otherwise).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def divisor(self) -> torch.Tensor:
        """What values are divided by before rounding (see :func:`nonzero_or_one`)."""
        full = self.scale if self.global_scale is None else self.scale * self.global_scale
        return nonzero_or_one(full)

    def select_block(self, index: int) -> BlockScales:
        """The scales of block ``index`` of every row, shaped ``(..., 1, 1)``."""
        part = slice(index, index + 1)
        zero_point = None if self.zero_point is None else self.zero_point[..., part, :]
        return BlockScales(self.scale[..., part, :], zero_point, self.global_scale)

    def dequantize(self, elements: torch.Tensor) -> torch.Tensor:
        """The float32 values of rounded ``elements`` (what ``round`` returned), as a new tensor."""
        return self.dequantize_(elements.clone())

    def dequantize_(self, elements: torch.Tensor) -> torch.Tensor:
        """:meth:`dequantize` in place: overwrites and returns ``elements``. (The fake quantizer
        owns its elements; a new weight-sized tensor per call costs it noticeable time.)"""
        if self.zero_point is not None:
            elements.sub_(self.zero_point)
        elements.mul_(self.scale)
        if self.global_scale is not None:
            # A second product rather than one by the full scale: element * block scale is exact
            # (NVFP4: 2 and 4 significant bits), so the result is rounded only once.
            elements.mul_(self.global_scale)
        return elements


@dataclass(frozen=True, eq=False)
class RoundedWeight:
    """A 2-D weight already rounded onto a format's grid: its ``elements`` (out, in; what
    ``round`` returns) and the ``scales`` of its blocks. Round-to-nearest gives one
    (:meth:`BlockScaledFormat.round_weight`); tuned rounding (GPTQ) gives another with other
    codes and scales, which exports store as they are (:meth:`BlockScaledFormat.encode_rounded`):
    quantizing its dequantized values again would not give them back."""

    elements: torch.Tensor
    scales: BlockScales
    block_size: int
    method: str = "rtn"  # how it was rounded: "rtn" (to nearest), "gptq" or "tuned"

    def values(self) -> torch.Tensor:
        """The float32 dequantized weight."""
        length = self.elements.shape[-1]
        blocks = to_blocks(self.elements, self.block_size)
        return from_blocks(self.scales.dequantize(blocks), length)


class BlockScaledFormat(Format):
    """A format of scaled blocks along the last dimension (see the module doc)."""

    #: Whether tuned rounding searches this format's scales (``quantize.gptq.clipped_scales``):
    #: a range shrunk by up to 20 % gives a finer scale. Not for scales that are powers of two
    #: (MX), which such a shrink changes only at a power-of-two boundary, where it halves the
    #: scale and clips the block's largest values to half their size.
    searches_scales: bool = True

    @abstractmethod
    def block_size(self, length: int) -> int:
        """Elements per block (per scale) in a row of ``length`` elements."""

    @abstractmethod
    def find_scales(self, blocks: torch.Tensor) -> BlockScales:
        """The scales of float32 ``blocks`` shaped ``(..., blocks, block_size)`` (GPTQ's
        ``find_params``)."""

    def group_scale_rule(self, blocks: torch.Tensor) -> Callable[[torch.Tensor], BlockScales]:
        """The rule for the scales of some of ``blocks`` (a whole weight's) on their own, as tuned
        rounding finds them group by group: ``find_scales``, unless the format also has a scale
        of the whole tensor, which it then fixes from ``blocks`` first (NVFP4)."""
        return self.find_scales

    @abstractmethod
    def round(self, x: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        """Round float32 ``x`` (broadcastable against ``scales``) onto the element grid with the
        given scales (GPTQ's ``quantize`` before dequantizing): float32 integer codes or
        minifloat values, a new tensor. ``scales.dequantize`` of the result is the value."""

    # --- how the elements and scales are stored (storage.py)

    @property
    @abstractmethod
    def element_bits(self) -> int:
        """Bits of one stored element code."""

    @abstractmethod
    def element_codes(self, elements: torch.Tensor) -> torch.Tensor:
        """The non-negative integer codes that store rounded ``elements``."""

    @abstractmethod
    def code_elements(self, codes: torch.Tensor) -> torch.Tensor:
        """The float32 elements that integer ``codes`` store (inverse of ``element_codes``)."""

    @abstractmethod
    def pack_scales(self, scales: BlockScales) -> dict[str, torch.Tensor]:
        """The stored scale parts of a 2-D weight's ``scales``."""

    @abstractmethod
    def unpack_scales(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> BlockScales:
        """The scales that ``parts`` (from :meth:`pack_scales`) store for a weight of ``shape``."""

    # --- built from the above

    def fake_quantize(
        self,
        x: torch.Tensor,
        find_scales: Callable[[torch.Tensor], BlockScales] | None = None,
    ) -> torch.Tensor:
        """Quantize-dequantize float32 ``x`` block-wise along its last dimension (any rank).

        ``find_scales`` replaces the format's scale rule (int8's float32 activation scales).
        """
        length = x.shape[-1]
        blocks = to_blocks(x, self.block_size(length))
        scales = (find_scales or self.find_scales)(blocks)
        return from_blocks(scales.dequantize_(self.round(blocks, scales)), length)

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fake_quantize(as_float32(weight)).to(weight.dtype)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        parts = self.part_bits(shape)
        return sum(parts.values()) if include_scales else parts["qweight"]

    def round_weight(self, weight: torch.Tensor) -> RoundedWeight:
        """``weight`` (out, in) rounded to nearest: its elements and block scales."""
        w = as_float32(weight.detach())
        length = w.shape[-1]
        size = self.block_size(length)
        blocks = to_blocks(w, size)
        scales = self.find_scales(blocks)
        return RoundedWeight(from_blocks(self.round(blocks, scales), length), scales, size)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode_rounded(self.round_weight(weight))

    def encode_rounded(self, rounded: RoundedWeight) -> dict[str, torch.Tensor]:
        """The stored parts of an already rounded weight (``encode`` of round-to-nearest)."""
        if rounded.block_size != self.block_size(rounded.elements.shape[-1]):
            raise ValueError(
                f"a weight rounded in blocks of {rounded.block_size} is not {self.name}"
            )
        codes = pack_bits(self.element_codes(rounded.elements), self.element_bits)
        return {"qweight": codes, **self.pack_scales(rounded.scales)}

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        check_parts(self, parts, shape)
        out_features, in_features = shape
        codes = unpack_bits(parts["qweight"], self.element_bits, out_features * in_features)
        elements = self.code_elements(codes.view(shape))
        scales = self.unpack_scales(parts, shape)
        values = scales.dequantize_(to_blocks(elements, self.block_size(in_features)))
        return from_blocks(values, in_features)


class MinifloatBlockFormat(BlockScaledFormat):
    """Block-scaled formats with minifloat elements: MX, NVFP4, FP8.

    Their activations are quantized with the weights' rule, scales computed at run time.
    """

    quantizes_activations = True

    #: The element type (a class attribute or property of each format).
    element: MinifloatSpec

    def round(self, x: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        return quantize_to_minifloat(x / scales.divisor(), self.element)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quantize(as_float32(x)).to(x.dtype)

    @property
    def element_bits(self) -> int:
        return self.element.bits

    def element_codes(self, elements: torch.Tensor) -> torch.Tensor:
        return minifloat_to_codes(elements, self.element)

    def code_elements(self, codes: torch.Tensor) -> torch.Tensor:
        return codes_to_minifloat(codes, self.element)
