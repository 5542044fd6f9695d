"""The ``packed`` export: bitplan's own layout of real low-bit weights (docs/EXPORT.md).

Each planned layer ``<name>`` is stored as the parts of :mod:`bitplan.formats.storage`
(``<name>.qweight``, ``<name>.scales``, ``<name>.zeros``, ...) instead of ``<name>.weight``;
everything else is stored as in a Hugging Face folder. config.json gets a
``quantization_config`` with ``"quant_method": "bitplan"`` naming every layer's format, which
:func:`bitplan.exporters.load.load_exported` reads to rebuild the fake-quantized model.
"""

from __future__ import annotations

from pathlib import Path

from bitplan.errors import BitplanError
from bitplan.exporters.backend import Backend
from bitplan.exporters.folder import (
    FORMAT_VERSION,
    model_dtype_name,
    write_config,
    write_side_files,
)
from bitplan.exporters.report import ExportReport, folder_report
from bitplan.exporters.shards import DEFAULT_SHARD_BYTES, ShardWriter
from bitplan.exporters.source import ExportSource
from bitplan.exporters.tensors import dense_tensors
from bitplan.formats import Format
from bitplan.formats.storage import PART_KINDS
from bitplan.plans import Plan

QUANT_METHOD = "bitplan"


def write_packed(
    source: ExportSource,
    plan: Plan,
    formats: dict[str, Format],
    folder: Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ExportReport:
    """Write the packed export into ``folder``."""
    for name, fmt in formats.items():  # refuse an unpackable format before the long part
        try:
            fmt.part_bits((1, 1))
        except BitplanError as err:
            raise BitplanError(f"cannot pack {name}: {err}") from None
    shards = ShardWriter(folder, {"format": "pt", "bitplan": "packed"}, max_shard_bytes)
    shards.add_all(dense_tensors(source, skip={f"{name}.weight" for name in formats}))
    kind_of: dict[str, str] = {}
    for name, fmt in formats.items():
        for part, tensor in source.encoded(name, fmt).items():
            key = f"{name}.{part}"
            shards.add(key, tensor)
            kind_of[key] = PART_KINDS[part]
    shards.finish()

    quantization_config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "layers": {name: fmt.name for name, fmt in formats.items()},
        "include_scales": plan.include_scales,
        "rounding": source.rounding,
        "avg_bits": plan.avg_bits,
        "plan_model": plan.model,
    }
    write_config(
        folder,
        source,
        dtype=model_dtype_name(d for k, d in shards.dtypes.items() if k not in kind_of),
        untie=source.head_name() in formats,
        extra={"quantization_config": quantization_config},
    )
    write_side_files(folder, source, plan)
    return folder_report(folder, "packed", source, formats, kind_of, [])


BACKEND = Backend("packed", write_packed)
