"""What an export back end is: a named writer that ``export_model`` runs inside an atomic
destination (``bitplan/exporters/writer.py`` lists the back ends).

A back end's ``write(source, plan, formats, destination, *, option=default, ...)`` receives the
model (an ``ExportSource``), the plan and its formats already checked against the model, and the
temporary folder (or file) to write into; it returns an ``ExportReport`` of what it wrote. Its
keyword-only parameters are the options ``export_model`` passes on to it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bitplan.exporters.report import ExportReport
from bitplan.exporters.source import ExportSource
from bitplan.formats import Format
from bitplan.plans import Plan

Write = Callable[[ExportSource, Plan, dict[str, Format], Path], ExportReport]


@dataclass(frozen=True)
class Backend:
    """One export format."""

    name: str  # what --format takes
    write: Write
    suffix: str | None = None  # a one-file format's file ending (".gguf"); None: a folder
    # Whether an existing file at the destination is an earlier export of this back end, which
    # --force may replace (a one-file format; folder exports are recognised by their plan file).
    is_own_file: Callable[[Path], bool] | None = None
    # Whether it stores tuned (e.g. GPTQ) codes and scales as given (``ExportSource.rounded``).
    stores_rounded: bool = True

    @property
    def options(self) -> list[str]:
        """The options ``write`` takes (its keyword-only parameters)."""
        parameters = inspect.signature(self.write).parameters.values()
        return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
