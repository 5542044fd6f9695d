"""Writing a planned model to disk, and reading bitplan's own exports back.

Three formats (docs/EXPORT.md):

* ``fake`` — an ordinary Hugging Face folder with quantize-dequantized weights;
* ``packed`` — bitplan's own layout of real low-bit codes and scales, loaded back by bitplan;
* ``compressed-tensors`` — the checkpoint format vLLM serves, written with that library.

>>> report = export_model(model, plan, "out/w4", format="packed")
>>> print(report.summary())
>>> again = load_exported("out/w4")  # a LoadedModel with FakeQuantLinear layers

Every export is written into a temporary folder next to ``out_dir`` and renamed into place when
complete, so a failure or an interrupt leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bitplan.errors import BitplanError
from bitplan.export.atomic import atomic_output_dir, check_output_dir
from bitplan.export.common import ExportReport, build_report, planned_formats
from bitplan.export.shards import DEFAULT_SHARD_BYTES
from bitplan.model.loading import LoadedModel
from bitplan.plans import Plan

EXPORT_FORMATS = ("fake", "packed", "compressed-tensors")

__all__ = [
    "EXPORT_FORMATS",
    "ExportReport",
    "check_output_dir",
    "export_kind",
    "export_model",
    "load_exported",
]


def _writer(format: str) -> Callable:
    if format == "fake":
        from bitplan.export.fake import write_fake

        return write_fake
    if format == "packed":
        from bitplan.export.packed import write_packed

        return write_packed
    if format == "compressed-tensors":
        try:
            from bitplan.export.compressed import write_compressed
        except ImportError as err:  # pragma: no cover - a dependency of bitplan
            raise BitplanError(f"the compressed-tensors export needs that package: {err}") from err
        return write_compressed
    raise BitplanError(
        f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}"
    )


def export_model(
    model: LoadedModel,
    plan: Plan,
    out_dir: str | os.PathLike,
    format: str,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ExportReport:
    """Quantize ``model`` with ``plan`` and write it to ``out_dir`` in ``format``.

    An existing ``out_dir`` is refused unless ``force`` (then replaced only once the new export
    is complete). ``model`` itself is not modified. A streamed model (``load_streaming``) is
    read from disk one tensor at a time and written in shards of at most ``max_shard_bytes``,
    so memory stays about one shard whatever the model's size.
    """
    writer = _writer(format)
    formats = planned_formats(model, plan)  # fail on a wrong plan before creating anything
    with atomic_output_dir(out_dir, force) as tmp:
        kind_of, notes = writer(model, plan, tmp, max_shard_bytes)
        notes += _identity_notes(model, plan)
        report = build_report(tmp, Path(out_dir), format, formats, model, kind_of, notes)
    return report


def _identity_notes(model: LoadedModel, plan: Plan) -> list[str]:
    # Plans from `bitplan search` record name@fingerprint; a plan moved to other weights of the
    # same architecture still applies, but the user should know.
    if "@" not in plan.model or not hasattr(model, "identity") or plan.model == model.identity:
        return []
    return [f"the plan was made for {plan.model}, this model is {model.identity}"]


def export_kind(path: str | os.PathLike) -> str | None:
    """``"packed"`` or ``"fake"`` if ``path`` is such a bitplan export, else None."""
    from bitplan.export.load import export_kind as kind

    return kind(path)


def load_exported(path: str | os.PathLike, **kwargs) -> LoadedModel:
    """Load a ``packed`` or ``fake`` export as a fake-quantized :class:`LoadedModel`."""
    from bitplan.export.load import load_exported as load

    return load(path, **kwargs)
