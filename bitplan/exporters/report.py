"""What an export wrote: one report for every back end, with its size set against the plan's bit
accounting."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from bitplan.exporters.shards import weight_files
from bitplan.exporters.source import ExportSource
from bitplan.formats import Format


@dataclass
class ExportReport:
    """What an export wrote, and how its size compares with the plan's bit accounting."""

    path: Path
    format: str  # the back end: fake, packed, compressed-tensors or gguf
    layers: int  # quantized (planned) layers
    plan_bits: int  # exact bits of the planned layers by the plan's accounting (scales included)
    plan_bits_without_scales: int
    planned_params: int  # weights of the planned layers
    file_bytes: int  # bytes on disk: the .safetensors file(s) of a folder, or the whole file
    quantized_bytes: int  # tensor bytes of the planned layers (codes + scales + zero points)
    dense_bytes: int  # tensor bytes of everything else (embeddings, norms, unplanned layers)
    header_bytes: int  # safetensors headers; a GGUF's metadata and alignment
    bytes_by_kind: dict[str, int] = field(default_factory=dict)  # codes / scales / zero points
    notes: list[str] = field(default_factory=list)
    # A GGUF file stores every tensor in a llama.cpp type:
    params: int = 0  # weights of every tensor in the file
    type_counts: dict[str, int] = field(default_factory=dict)  # stored type -> tensors
    embedding_type: str = ""
    output_type: str = ""

    @property
    def plan_bytes(self) -> float:
        return self.plan_bits / 8

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all tensor data."""
        return self.quantized_bytes + self.dense_bytes

    @property
    def bits_per_weight(self) -> float:
        """Whole-file bits per weight, as llama.cpp prints it (tensor bytes x 8 / weights)."""
        return self.tensor_bytes * 8 / self.params

    @property
    def planned_bits_per_weight(self) -> float:
        return self.plan_bits / self.planned_params

    def summary(self) -> str:
        """Lines for the command line."""
        return "\n".join(self._gguf_lines() if self.format == "gguf" else self._folder_lines())

    def _folder_lines(self) -> list[str]:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in self.bytes_by_kind.items())
        lines = [
            f"wrote {self.format} export to {self.path}/",
            f"  weight file(s): {self.file_bytes:,} bytes = quantized layers "
            f"{self.quantized_bytes:,} ({kinds}) + other tensors {self.dense_bytes:,} "
            f"+ headers {self.header_bytes:,}",
            f"  plan accounting for the {self.layers} quantized layers: {self.plan_bits:,} bits "
            f"= {self.plan_bits / 8:,.1f} bytes (without scales {self.plan_bits_without_scales:,}"
            " bits)",
        ]
        return lines + [f"  note: {note}" for note in self.notes]

    def _gguf_lines(self) -> list[str]:
        types = ", ".join(f"{name} x{n}" for name, n in sorted(self.type_counts.items()))
        return [
            f"wrote GGUF {self.path} ({self.file_bytes:,} bytes)",
            f"  tensors: {self.tensor_bytes:,} bytes for {self.params:,} weights = "
            f"{self.bits_per_weight:.4f} bits per weight (whole file; {types})",
            f"  planned layers: {self.planned_bits_per_weight:.4f} bits per weight; token "
            f"embedding {self.embedding_type}, output {self.output_type}",
        ] + [f"  note: {note}" for note in self.notes]


def export_report(
    path: Path,
    export_format: str,
    source: ExportSource,
    formats: dict[str, Format],
    **written: object,
) -> ExportReport:
    """The report of an export of ``formats``: the plan's side (bits of the planned layers by
    the formats' accounting) computed here, the file's side (``written``: file_bytes,
    quantized_bytes, ...) as the back end measured it."""
    shapes = {layer.name: layer.shape for layer in source.layers}
    modules = dict(source.module.named_modules())
    with_scales = without = params = 0
    for name, fmt in formats.items():
        shape = shapes.get(name)
        if shape is None:  # (out, in) of a Linear; (rows, width) of a GGUF plan's embedding
            shape = tuple(modules[name].weight.shape)
        with_scales += fmt.weight_bits(shape, include_scales=True)
        without += fmt.weight_bits(shape, include_scales=False)
        params += math.prod(shape)
    return ExportReport(
        path=path,
        format=export_format,
        layers=len(formats),
        plan_bits=with_scales,
        plan_bits_without_scales=without,
        planned_params=params,
        **written,
    )


def safetensors_layout(path: Path) -> tuple[dict[str, int], int]:
    """Tensor name -> bytes of its data, and the header size, read from a .safetensors file."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    sizes = {
        name: info["data_offsets"][1] - info["data_offsets"][0]
        for name, info in header.items()
        if name != "__metadata__"
    }
    return sizes, 8 + header_len


def folder_report(
    folder: Path,
    export_format: str,
    source: ExportSource,
    formats: dict[str, Format],
    kind_of: dict[str, str],
    notes: list[str],
) -> ExportReport:
    """The report of a folder export, measured from its weight file(s); ``kind_of`` maps each
    quantized tensor's name to its kind (codes, scales, zero points, ...); the other tensors
    count as dense."""
    files = weight_files(folder)
    sizes, header = {}, 0
    for path in files:
        file_sizes, file_header = safetensors_layout(path)
        sizes.update(file_sizes)
        header += file_header
    by_kind: dict[str, int] = {}
    quantized = dense = 0
    for name, nbytes in sizes.items():
        kind = kind_of.get(name)
        if kind is None:
            dense += nbytes
        else:
            quantized += nbytes
            by_kind[kind] = by_kind.get(kind, 0) + nbytes
    return export_report(
        folder,
        export_format,
        source,
        formats,
        file_bytes=sum(path.stat().st_size for path in files),
        quantized_bytes=quantized,
        dense_bytes=dense,
        header_bytes=header,
        bytes_by_kind=by_kind,
        notes=notes,
    )
