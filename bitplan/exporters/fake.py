"""The ``fake`` export: an ordinary Hugging Face folder whose planned weights are already
quantize-dequantized.

Plain ``AutoModelForCausalLM.from_pretrained`` loads it (and then runs activations unquantized);
bitplan's loader reads the ``"bitplan"`` entry of config.json and re-applies the activation
quantization of the formats that have one (MX, NVFP4, FP8, INT8 W8A8).

Fake-quantized values are not all exact in bfloat16 (an integer code times a float16 scale can
need 19 significant bits), so each tensor is stored in bfloat16 only when that is lossless and
in float32 otherwise; config.json then says float32 so that ``from_pretrained``'s default dtype
keeps every value. Reloaded weights equal the in-memory fake model's exactly.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

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
from bitplan.exporters.tensors import dense_tensors, storage_tensor
from bitplan.formats import Format
from bitplan.plans import Plan

#: Key of bitplan's record in a fake export's config.json.
CONFIG_KEY = "bitplan"


def write_fake(
    source: ExportSource,
    plan: Plan,
    formats: dict[str, Format],
    folder: Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ExportReport:
    """Write the fake export into ``folder``."""
    keys = {name: f"{name}.weight" for name in formats}
    shards = ShardWriter(folder, {"format": "pt"}, max_shard_bytes)
    shards.add_all(dense_tensors(source, skip=set(keys.values())))
    for name, fmt in formats.items():
        # What FakeQuantLinear.from_linear holds: quantized in the model's dtype.
        shards.add(keys[name], storage_tensor(source.quantized_weight(name, fmt)))
    shards.finish()
    record = {
        "export_format": "fake",
        "format_version": FORMAT_VERSION,
        "layer_formats": {name: fmt.name for name, fmt in formats.items()},
        "rounding": source.rounding,
        "activation_formats": {  # a GGUF plan's embedding has no input to round
            name: fmt.name
            for name, fmt in formats.items()
            if fmt.quantizes_activations
            and isinstance(source.module.get_submodule(name), nn.Linear)
        },
    }
    write_config(
        folder,
        source,
        dtype=model_dtype_name(shards.dtypes.values()),
        untie=source.head_name() in formats,
        extra={CONFIG_KEY: record},
    )
    write_side_files(folder, source, plan)
    kind_of = {key: "fake-quantized weights" for key in keys.values()}
    notes = [
        "fake export: weights are stored dequantized (bfloat16 where exact, else float32), so "
        "its size says nothing about the plan's bits; plain transformers loads it but runs "
        "activations unquantized"
    ]
    return folder_report(folder, "fake", source, formats, kind_of, notes)


BACKEND = Backend("fake", write_fake)
