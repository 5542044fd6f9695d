"""Per-format handlers that a back end looks up by the format's type (torchao's pattern).

A back end that treats each kind of format its own way (how compressed-tensors stores MX, say)
keeps one registry and registers one handler per format type, instead of an ``isinstance``
chain::

    COMPRESSED = HandlerRegistry("compressed-tensors")

    @COMPRESSED.register(MXFormat)
    class MXHandler: ...

    COMPRESSED.lookup(fmt)  # -> MXHandler for any MXFormat; BitplanError naming both otherwise

A handler registered for a class also serves its subclasses (the nearest registered class in
the format's method resolution order wins). What a handler is (a class, a function, an object)
is the back end's business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from bitplan.errors import BitplanError
from bitplan.formats.base import Format

Handler = TypeVar("Handler")


class HandlerRegistry(Generic[Handler]):
    """Format type -> handler, for the back end called ``backend`` (used in error messages)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._handlers: dict[type[Format], Handler] = {}

    def register(self, *format_types: type[Format]) -> Callable[[Handler], Handler]:
        """Decorator: ``handler`` serves every format of ``format_types`` (and subclasses)."""
        if not format_types:
            raise TypeError("register() needs at least one format type")

        def decorate(handler: Handler) -> Handler:
            for format_type in format_types:
                if format_type in self._handlers:
                    raise BitplanError(
                        f"{self.backend} already has a handler for {format_type.__name__}"
                    )
                self._handlers[format_type] = handler
            return handler

        return decorate

    def find(self, fmt: Format) -> Handler | None:
        """The handler of ``fmt``'s type, or None when the back end has none."""
        for cls in type(fmt).__mro__:
            if cls in self._handlers:
                return self._handlers[cls]
        return None

    def lookup(self, fmt: Format) -> Handler:
        """The handler of ``fmt``'s type; raises :class:`BitplanError` naming the back end, the
        format and the formats it handles when there is none."""
        handler = self.find(fmt)
        if handler is None:
            handled = ", ".join(sorted(cls.__name__ for cls in self._handlers))
            raise BitplanError(
                f"{self.backend} cannot handle format {fmt.name} ({type(fmt).__name__}); "
                f"it handles {handled or 'no formats'}"
            )
        return handler

    def format_types(self) -> list[type[Format]]:
        """The registered format types, in registration order (e.g. to list a back end's
        choices)."""
        return list(self._handlers)
