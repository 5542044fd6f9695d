"""The per-format handler registry that back ends look formats up in."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bitplan.errors import BitplanError
from bitplan.formats import HandlerRegistry, IntFormat, MXFormat, NVFP4Format, parse_format


def test_lookup_finds_the_handler_registered_for_the_format_type():
    registry = HandlerRegistry("demo")

    @registry.register(IntFormat, MXFormat)
    def blocky():
        return "blocky"

    assert registry.lookup(parse_format("w4g128")) is blocky
    assert registry.lookup(parse_format("mxfp6")) is blocky
    assert registry.find(parse_format("nvfp4")) is None
    assert registry.format_types() == [IntFormat, MXFormat]


def test_subclasses_use_the_nearest_registered_handler():
    @dataclass(frozen=True)
    class TunedMX(MXFormat):
        pass

    registry = HandlerRegistry("demo")
    registry.register(MXFormat)("mx")
    assert registry.lookup(TunedMX(4)) == "mx"
    registry.register(TunedMX)("tuned")
    assert registry.lookup(TunedMX(4)) == "tuned"
    assert registry.lookup(MXFormat(4)) == "mx"


def test_a_missing_handler_is_a_clear_error_naming_back_end_and_format():
    registry = HandlerRegistry("compressed-tensors")
    registry.register(IntFormat)("int")
    with pytest.raises(BitplanError, match=r"compressed-tensors cannot handle format nvfp4 "):
        registry.lookup(NVFP4Format())
    with pytest.raises(BitplanError, match="it handles IntFormat"):
        registry.lookup(parse_format("q4_k"))


def test_registering_a_type_twice_is_refused():
    registry = HandlerRegistry("demo")
    registry.register(IntFormat)("first")
    with pytest.raises(BitplanError, match="already has a handler for IntFormat"):
        registry.register(IntFormat)("second")
    with pytest.raises(TypeError):
        registry.register()
