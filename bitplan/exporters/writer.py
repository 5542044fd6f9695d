"""The one export interface: ``export_model`` checks the plan against the model once, opens an
atomic destination (a folder, or one file for GGUF), lets the chosen back end write into it, and
returns the back end's ``ExportReport``.

To add a back end: write ``bitplan/exporters/<name>.py`` with a ``write`` function and a
``BACKEND = Backend(...)`` (see ``bitplan/exporters/backend.py``), and list it in ``BACKENDS``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

from bitplan.atomic import atomic_file, atomic_folder, check_output_dir, check_output_file
from bitplan.errors import BitplanError
from bitplan.exporters import compressed, fake, gguf, packed
from bitplan.exporters.backend import Backend
from bitplan.exporters.folder import PLAN_FILE
from bitplan.exporters.report import ExportReport
from bitplan.exporters.rounded_store import rounded_facts
from bitplan.exporters.source import ExportSource, planned_formats
from bitplan.formats import Format
from bitplan.formats.block_scaled import RoundedWeight
from bitplan.plans import Plan

#: Every back end, by the name ``--format`` takes, in the order help texts list them.
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (fake.BACKEND, packed.BACKEND, compressed.BACKEND, gguf.BACKEND)
}
EXPORT_FORMATS = tuple(BACKENDS)


def get_backend(format: str) -> Backend:
    backend = BACKENDS.get(format)
    if backend is None:
        raise BitplanError(
            f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    return backend


def check_destination(
    out: str | os.PathLike,
    format: str,
    force: bool = False,
    reading: str | os.PathLike | None = None,
) -> Path:
    """Refuse ``out`` for an export in ``format`` before any long work, so that the user learns
    at once: the model being read (``reading``) or a folder holding it, always; a file where a
    folder goes, or a wrong file ending; an existing ``out`` unless ``force``, and even with
    ``force`` anything bitplan did not write (a folder without its plan file, a file without
    bitplan's mark), so that nothing of the user's is ever replaced."""
    backend = get_backend(format)
    if reading is not None and _holds(Path(out).expanduser(), Path(reading).expanduser()):
        raise BitplanError(
            f"{out} is where the model is read from ({reading}); write the export elsewhere"
        )
    if _holds(Path(out).expanduser(), Path.cwd()):
        raise BitplanError(f"{out} is the current folder or holds it; write the export elsewhere")
    if backend.suffix is None:
        out = check_output_dir(out, force)
    else:
        out = check_output_file(out, force)
        if out.suffix != backend.suffix:
            raise BitplanError(
                f"a {format} export is one file ending in {backend.suffix}, not {out}"
            )
    if out.exists() and not _written_by_bitplan(out, backend):
        kind = PLAN_FILE if backend.suffix is None else "bitplan.plan key in its metadata"
        raise BitplanError(
            f"{out} exists and bitplan did not write it (it has no {kind}); --force replaces "
            "only bitplan's own exports: remove it yourself or choose another --out"
        )
    return out


def check_importance_format(imatrix: bool, format: str) -> None:
    """Refuse an importance matrix for an export that does not use one (only gguf does)."""
    if imatrix and format != "gguf":
        raise BitplanError(f"an importance matrix (--imatrix) is for the gguf export, not {format}")


def check_rounded(source: ExportSource, formats: dict[str, Format], backend: Backend) -> None:
    """Tuned weights must be of the plan's layers and formats, and the back end must store
    them (GGUF has its own super-block layout that GPTQ does not round for yet)."""
    for name, facts in rounded_facts(source.rounded).items():
        fmt = formats.get(name)
        if fmt is None:
            raise BitplanError(f"a tuned weight is given for {name}, which the plan does not list")
        if facts.block_size != fmt.block_size(facts.row_length):
            raise BitplanError(f"the tuned weight of {name} was not rounded as {fmt.name}")
    if source.rounded and not backend.stores_rounded:
        raise BitplanError(
            f"the {backend.name} export cannot store {source.rounding}-rounded weights yet; "
            "export with round-to-nearest (--rounding rtn) or choose another --format"
        )


def _holds(out: Path, model_path: Path) -> bool:
    """Whether replacing ``out`` would replace ``model_path`` (the same path, or a folder
    holding it)."""
    out, model_path = out.resolve(), model_path.resolve()
    return out == model_path or out in model_path.parents


def _written_by_bitplan(out: Path, backend: Backend) -> bool:
    if backend.suffix is None:
        return (out / PLAN_FILE).is_file()
    return backend.is_own_file is not None and backend.is_own_file(out)


def _destination(backend: Backend, out: Path, force: bool) -> AbstractContextManager[Path]:
    return atomic_folder(out, force) if backend.suffix is None else atomic_file(out, force)


def export_model(
    model: object,
    plan: Plan,
    out: str | os.PathLike,
    format: str,
    force: bool = False,
    rounded: Mapping[str, RoundedWeight] | None = None,
    **options: object,
) -> ExportReport:
    """Quantize ``model`` (a ``LoadedModel`` or an ``ExportSource``) with ``plan`` and write it
    to ``out`` in ``format`` (``EXPORT_FORMATS``).

    An existing ``out`` is refused unless ``force`` (then replaced only once the new export is
    complete: a failure or an interrupt leaves nothing behind). ``model`` itself is not
    modified. ``rounded`` holds the codes and scales of layers rounded otherwise than to
    nearest (``bitplan.quantization.rounded_weights`` of a GPTQ model): they are stored as they are.
    ``options`` go to the back end: ``max_shard_bytes`` for the folder formats (a
    streamed model is read one tensor at a time and written in shards of at most that many
    bytes); ``embedding_type``, ``output_type``, ``importance``, ``metadata_from`` for gguf.
    """
    backend = get_backend(format)
    unknown = sorted(set(options) - set(backend.options))
    if unknown:
        takes = ", ".join(backend.options) or "none"
        raise BitplanError(f"the {format} export has no option {unknown[0]} (it takes: {takes})")
    source = ExportSource.of(model)
    if rounded:  # as given: a RoundedStore stays on disk, read one layer at a time
        source = dataclasses.replace(source, rounded=rounded)
    formats = planned_formats(source, plan)  # fail on a wrong plan before creating anything
    check_rounded(source, formats, backend)
    out = check_destination(out, format, force, reading=source.origin)
    with _destination(backend, out, force) as tmp:
        report = backend.write(source, plan, formats, tmp, **options)
    notes = report.notes + _identity_notes(model, plan)
    return dataclasses.replace(report, path=out, notes=notes)


def _identity_notes(model: object, plan: Plan) -> list[str]:
    # Plans from `bitplan search` record name@fingerprint; a plan moved to other weights of the
    # same architecture still applies, but the user should know.
    if "@" not in plan.model or not hasattr(model, "identity") or plan.model == model.identity:
        return []
    return [f"the plan was made for {plan.model}, this model is {model.identity}"]
