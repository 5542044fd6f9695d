"""Number formats: how a tensor is quantized, how a quantized weight is stored, what it costs.

One family per module (``integer``, ``mx``, ``nvfp4``, ``fp8``, ``bf16``, ``gguf``); the first
four share the ``block_scaled`` core (choose a block's scales, round with given scales) on top of
``minifloat`` rounding and ``blocks`` helpers. ``storage`` describes the packed layout that
``fmt.encode`` / ``fmt.decode`` write and read (bits packed by ``packing``); ``registry`` turns
names into formats; ``handlers`` lets back ends register per-format handlers.

>>> from bitplan.formats import parse_format
>>> fmt = parse_format("mxfp4")
>>> fmt.bits_per_weight((4096, 4096))
4.25
"""

from bitplan.formats.base import Format
from bitplan.formats.bf16 import BF16Format
from bitplan.formats.block_scaled import BlockScaledFormat, BlockScales
from bitplan.formats.fp8 import FP8Format
from bitplan.formats.handlers import HandlerRegistry
from bitplan.formats.integer import Int8W8A8Format, IntFormat
from bitplan.formats.minifloat import E2M1, E2M3, E4M3, MinifloatSpec, quantize_to_minifloat
from bitplan.formats.mx import MXFormat
from bitplan.formats.nvfp4 import NVFP4Format
from bitplan.formats.registry import known_format_names, parse_format, parse_format_list

__all__ = [
    "E2M1",
    "E2M3",
    "E4M3",
    "BF16Format",
    "BlockScaledFormat",
    "BlockScales",
    "FP8Format",
    "Format",
    "HandlerRegistry",
    "Int8W8A8Format",
    "IntFormat",
    "MXFormat",
    "MinifloatSpec",
    "NVFP4Format",
    "known_format_names",
    "parse_format",
    "parse_format_list",
    "quantize_to_minifloat",
]
