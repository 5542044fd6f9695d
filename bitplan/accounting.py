"""Bit accounting: how many bits a set of layers costs under given formats.

Average bits are always total bits / total weight elements over the layers counted, so a large
layer weighs more than a small one, as on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from bitplan.formats.base import Format
from bitplan.model.layers import LayerInfo


def layer_bits(layer: LayerInfo, fmt: Format, include_scales: bool = True) -> int:
    """Exact bits of one layer's weight under ``fmt``."""
    return fmt.weight_bits(layer.shape, include_scales)


def average_bits(
    layers: Iterable[LayerInfo],
    fmt_of: Format | Mapping[str, Format] | Callable[[LayerInfo], Format],
    include_scales: bool = True,
) -> float:
    """Average bits per weight over ``layers``; ``fmt_of`` is one format for all, a mapping from
    layer name to format, or a function of the layer."""
    if isinstance(fmt_of, Format):
        one = fmt_of
        fmt_of = lambda _layer: one  # noqa: E731
    elif isinstance(fmt_of, Mapping):
        table = fmt_of
        fmt_of = lambda layer: table[layer.name]  # noqa: E731
    total_bits = total_weights = 0
    for layer in layers:
        total_bits += layer_bits(layer, fmt_of(layer), include_scales)
        total_weights += layer.params
    if total_weights == 0:
        raise ValueError("no layers to average over")
    return total_bits / total_weights
