"""Writing a planned model to disk, and reading bitplan's own exports back.

Four formats, each a back end behind one ``export_model`` (docs/EXPORT.md, docs/GGUF.md):

* ``fake`` — an ordinary Hugging Face folder with quantize-dequantized weights;
* ``packed`` — bitplan's own layout of real low-bit codes and scales, loaded back by bitplan;
* ``compressed-tensors`` — the checkpoint format vLLM serves, written with that library;
* ``gguf`` — one file that llama.cpp runs.

>>> report = export_model(model, plan, "out/w4", format="packed")
>>> print(report.summary())
>>> again = bitplan.model.load_model("out/w4")  # FakeQuantLinear layers again

Every export is written into a temporary folder (or file) next to ``out`` and renamed into
place when complete, so a failure or an interrupt leaves nothing behind. The back ends read the
model as an ``ExportSource`` (module, layer table, weight reader); nothing here imports
``bitplan.model``, which opens bitplan's exports through ``bitplan/exporters/load.py``.
"""

from bitplan.exporters.load import export_kind
from bitplan.exporters.report import ExportReport
from bitplan.exporters.source import ExportSource
from bitplan.exporters.writer import (
    EXPORT_FORMATS,
    check_destination,
    check_importance_format,
    export_model,
)

__all__ = [
    "EXPORT_FORMATS",
    "ExportReport",
    "ExportSource",
    "check_destination",
    "check_importance_format",
    "export_kind",
    "export_model",
]
