"""bitplan's packed layout: the parts a format stores for one weight (see docs/EXPORT.md).

``fmt.encode(w)`` returns these tensors, ``fmt.decode(parts, shape)`` rebuilds the float32
weight from them, and ``fmt.part_bits(shape)`` gives each part's exact bits, which add up to
``fmt.weight_bits(shape)``:

==========  ==============================================================================
part        contents
==========  ==============================================================================
qweight     element codes, bit-packed (``packing.pack_bits``), 1-D uint8
scales      integer: float16 per group; MX: E8M0 exponents (uint8, bias 127) per 32;
            NVFP4: E4M3 (``float8_e4m3fn``) per 16; FP8: float32 per output row
zeros       asymmetric integer formats: zero points, bit-packed like qweight
global_sc.  NVFP4: the float32 tensor scale, shape ``(1,)``
weight      ``bf16`` layers: the weight in bfloat16 (16 bits per weight, nothing else)
==========  ==============================================================================

A format's fake quantization is ``decode(encode(w))``: both run the format's one scale rule and
one rounding rule (``block_scaled.py``), so they agree bit for bit (the tests check every
format). Formats without this layout (GGUF types) raise :func:`no_packed_layout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bitplan.errors import BitplanError

if TYPE_CHECKING:
    from bitplan.formats.base import Format

#: Part name -> kind reported in size tables.
PART_KINDS = {
    "qweight": "codes",
    "weight": "codes",
    "scales": "scales",
    "global_scale": "scales",
    "zeros": "zero points",
}


def no_packed_layout(fmt: Format) -> BitplanError:
    """The error for a format that has no packed layout."""
    return BitplanError(
        f"format {fmt.name} has no packed layout (packed: integer, MX, NVFP4, FP8, bf16); "
        "export it as fake"
    )


def check_parts(fmt: Format, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> None:
    """Raise :class:`BitplanError` naming the parts that ``fmt`` stores but ``parts`` lacks."""
    missing = set(fmt.part_bits(shape)) - set(parts)
    if missing:
        raise BitplanError(f"a {fmt.name} layer needs {', '.join(sorted(missing))} as well")
