"""Format names: parsing a name (or a comma-separated list of names) into a :class:`Format`.

Grammar (case-insensitive, surrounding spaces ignored):

* ``bf16``, ``fp8``, ``int8`` (W8A8), ``mxfp4``, ``mxfp6``, ``mxfp8``, ``nvfp4``;
* ``w{b}g{group}`` — integer weight-only, ``b`` in {2, 3, 4, 8} bits, symmetric, one scale per
  ``group`` weights along the input dimension, e.g. ``w4g128``;
* ``w{b}`` — the same with one scale per output channel;
* either of those with ``_asym`` appended — asymmetric, with a zero point per group;
* either of those with ``_fr`` appended — symmetric full range: a signed scale puts each group's
  largest magnitude on the extra negative code (auto-round's ``int_sym``, llama.cpp's Q4_0);
* ``w{b}a16`` — auto-round's preset names (W4A16 ...): the same format as ``w{b}g128_fr``
  (auto-round's presets use its full-range ``int_sym`` rule);
* ``int8_w8a8`` — auto-round's name for ``int8``.

Every format's canonical name parses back to an equal format: ``parse_format(f.name) == f``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from bitplan.errors import BitplanError
from bitplan.formats.base import Format
from bitplan.formats.bf16 import BF16Format
from bitplan.formats.fp8 import FP8Format
from bitplan.formats.gguf import parse_gguf_name
from bitplan.formats.integer import SUPPORTED_INT_BITS, Int8W8A8Format, IntFormat
from bitplan.formats.mx import MXFormat
from bitplan.formats.nvfp4 import NVFP4Format

#: Formats with a fixed name.
_NAMED_FORMATS: dict[str, Format] = {
    fmt.name: fmt
    for fmt in (
        BF16Format(),
        FP8Format(),
        Int8W8A8Format(),
        MXFormat(4),
        MXFormat(6),
        MXFormat(8),
        NVFP4Format(),
    )
}

#: Other spellings people bring from other tools.
_ALIASES = {"int8_w8a8": "int8"}

# w4g128, w4, w4g128_asym, w4_fr. A negative group is matched so it can be reported as invalid.
_INT_PATTERN = re.compile(r"w(\d+)(?:g(-?\d+))?(_asym|_fr)?")
# auto-round presets: W4A16 = 4-bit full-range symmetric integer weights, group 128, 16-bit
# activations.
_PRESET_PATTERN = re.compile(r"w(\d+)a16")
_PRESET_GROUP_SIZE = 128

_INT_BITS = ",".join(map(str, SUPPORTED_INT_BITS))
GRAMMAR = (
    f"w{{{_INT_BITS}}}g{{group}}[_asym|_fr] (integer weight-only, e.g. w4g128), "
    f"w{{{_INT_BITS}}}[_asym|_fr] (per-channel), w{{{_INT_BITS}}}a16 (= w{{b}}g128_fr)"
)
GRAMMAR += ", GGUF types q2_k..q6_k, q4_0, q4_1, q5_0, q5_1, q8_0, f16, f32, gguf:mxfp4, gguf:bf16"
GRAMMAR += ", iq4_nl, iq4_xs, iq3_s, iq3_xxs, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s"


def known_format_names() -> list[str]:
    """A representative list of format names (what ``bitplan info`` shows)."""
    integer_names = [f"w{bits}g128" for bits in SUPPORTED_INT_BITS]
    integer_names += ["w2g64", "w3g64", "w4g64", "w4g32", "w2g128_asym", "w3g128_asym"]
    integer_names += ["w4g128_asym", "w2g128_fr", "w4g128_fr", "w4", "w8", "w4_asym"]
    return sorted(_NAMED_FORMATS) + integer_names


def _unknown_format_error(name: str) -> BitplanError:
    message = f"unknown format {name!r}"
    suggestions = difflib.get_close_matches(name, known_format_names(), n=1)
    if suggestions:
        message += f" (did you mean {suggestions[0]!r}?)"
    return BitplanError(f"{message}; known: {', '.join(sorted(_NAMED_FORMATS))}, {GRAMMAR}")


def parse_format(name: str) -> Format:
    """The format called ``name``; raises :class:`BitplanError` listing the known names."""
    if not isinstance(name, str):
        raise BitplanError(f"a format name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _NAMED_FORMATS:
        return _NAMED_FORMATS[key]
    try:
        if match := _PRESET_PATTERN.fullmatch(key):
            return IntFormat(int(match[1]), _PRESET_GROUP_SIZE, full_range=True)
        if match := _INT_PATTERN.fullmatch(key):
            bits, group, variant = match.groups()
            group_size = None if group is None else int(group)
            return IntFormat(
                int(bits), group_size, symmetric=variant != "_asym", full_range=variant == "_fr"
            )
    except BitplanError as error:
        raise BitplanError(f"invalid format {name.strip()!r}: {error}") from None
    # --- GGUF (llama.cpp) tensor types: q4_k, Q8_0, gguf:q4_k_s, gguf:mxfp4 (formats/gguf.py).
    if (gguf_format := parse_gguf_name(key)) is not None:
        return gguf_format
    # --- end GGUF
    raise _unknown_format_error(name.strip())


def _gguf_all(imatrix: bool) -> list[str]:
    """Every llama.cpp type a plan can choose, from IQ1_S to BF16 (F16 and F32 add nothing
    BF16 does not give at the same or lower cost); without an importance matrix, only the
    types llama.cpp quantizes without one."""
    from bitplan.formats.gguf import gguf_format_names

    names = [name for name in gguf_format_names() if name not in ("f16", "f32")]
    return [name for name in names if imatrix or not parse_format(name).requires_importance]


#: Names that stand for a whole set of options in a list (``--options gguf-all``), given
#: whether an importance matrix will be there.
OPTION_SETS = {"gguf-all": _gguf_all}


def parse_format_list(names: str | Iterable[str], imatrix: bool = False) -> list[Format]:
    """Parse ``"mxfp4,mxfp8"`` (or a list of names) into formats, in order; a name of
    :data:`OPTION_SETS` (``gguf-all``) stands for all of its formats (with ``imatrix``, also
    those that need an importance matrix).

    Empty entries are skipped; a format named twice (even under two spellings, such as
    ``w4a16`` and ``w4g128_fr``) raises :class:`BitplanError`, as does an empty list.
    """
    if isinstance(names, str):
        names = names.split(",")
    formats: list[Format] = []
    spelled_as: dict[Format, str] = {}
    expanded = []
    for raw_name in names:
        option_set = OPTION_SETS.get(raw_name.strip().lower())
        expanded += option_set(imatrix) if option_set is not None else [raw_name]
    for raw_name in expanded:
        if not raw_name.strip():
            continue
        fmt = parse_format(raw_name)
        if fmt in spelled_as:
            raise BitplanError(
                f"format {fmt.name!r} is listed twice (as {spelled_as[fmt]!r} and "
                f"{raw_name.strip()!r}); list each format once"
            )
        spelled_as[fmt] = raw_name.strip()
        formats.append(fmt)
    if not formats:
        raise BitplanError(f"no format names given; known: {', '.join(known_format_names())}")
    return formats
