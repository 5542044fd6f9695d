"""The ``gguf`` export: a plan written as one GGUF file that llama.cpp runs (docs/GGUF.md).

Which tensor gets which llama.cpp type is ``bitplan/exporters/gguf_layout.py``. The tokenizer and
the ``general.*`` keys are copied from the GGUF file the model was loaded from (the embedded
default model comes from one); llama.cpp's hyperparameters (``llama.*``, ``gemma3.*`` ...) are
written from the model's config, as ``bitplan/exporters/gguf_architectures.py`` says for its
architecture. Models loaded from a Hugging Face folder are refused for now, unless
``metadata_from`` names a GGUF with the same tokenizer. Tensors are quantized and written one at
a time.

The same numbers as a torch model: ``bitplan.quantization.gguf.fake_quantize_gguf``; the file run by
llama.cpp: ``bitplan.evaluation.llama_cpp.LlamaCppModel``; the importance matrix:
``bitplan.scoring.importance.collect_importance``.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from bitplan.errors import BitplanError
from bitplan.exporters.backend import Backend
from bitplan.exporters.gguf_architectures import (
    attention_notes,
    gguf_architecture,
    write_hyperparameters,
)
from bitplan.exporters.gguf_layout import GGUFTensor, permute_rows, tensor_layout
from bitplan.exporters.report import ExportReport, export_report
from bitplan.exporters.source import ExportSource, planned_formats
from bitplan.formats import Format
from bitplan.formats.gguf import quantize_rows
from bitplan.plans import Plan

#: Keys not copied from the source GGUF (the writer sets the architecture; the file type of a
#: mixed file is left for llama.cpp to guess from its tensors).
#: The metadata key that holds the plan of a GGUF bitplan wrote (and marks the file as bitplan's).
_PLAN_KEY = "bitplan.plan"
_SKIPPED_KEYS = {"general.architecture", "general.file_type"}


# ---------------------------------------------------------------------------------------------
# Metadata and tokenizer from the source GGUF.


def _source_metadata(path: Path) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """The source's ``general.*`` and ``tokenizer.*`` keys as (key, value, type, item type)."""
    stat = path.stat()
    return _read_metadata(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_metadata(path: str, _mtime: int, _size: int) -> list:
    # Parsing a 49k-token vocabulary takes gguf's reader many seconds: read each file once.
    entries = []
    for key, fld in GGUFReader(path).fields.items():
        if not key.startswith(("general.", "tokenizer.")) or key in _SKIPPED_KEYS:
            continue
        vtype = fld.types[0]
        sub_type = None
        if vtype == GGUFValueType.ARRAY:
            if len(fld.types) != 2:
                raise BitplanError(f"cannot copy the nested GGUF array {key!r} of {path}")
            sub_type = fld.types[1]
        entries.append((key, fld.contents(), vtype, sub_type))
    return entries


def _check_tokenizer(metadata: list, source: ExportSource, path: Path) -> None:
    tokens = next((value for key, value, *_ in metadata if key == "tokenizer.ggml.tokens"), None)
    vocab = source.module.config.vocab_size
    if tokens is None or len(tokens) != vocab:
        raise BitplanError(
            f"{path} has no tokenizer of {vocab} tokens; pass the GGUF the model came from "
            "as metadata_from"
        )


# ---------------------------------------------------------------------------------------------
# Quantizing and writing.


def _tensor_bytes(
    tensor: GGUFTensor, param: torch.Tensor, importance: Mapping[str, np.ndarray]
) -> np.ndarray:
    """The bytes stored for one tensor."""
    weight = param.detach().to("cpu", torch.float32)
    if tensor.offset:
        weight = weight + tensor.offset
    if tensor.heads is not None:
        weight = permute_rows(weight, tensor.heads)
    data = quantize_rows(
        weight.reshape(-1, weight.shape[-1]).numpy(),
        tensor.type_name,
        tensor.importance(importance),
    )
    return data.reshape(-1) if param.dim() == 1 else data


def write_gguf(
    source: ExportSource,
    plan: Plan,
    formats: dict[str, Format],
    path: Path,
    *,
    embedding_type: str | None = None,
    output_type: str | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    metadata_from: str | os.PathLike | None = None,
) -> ExportReport:
    """Write the GGUF file ``path``.

    ``embedding_type`` / ``output_type``: the token embedding's and the output tensor's types
    when the plan does not set them (default Q4_K / Q6_K, as llama.cpp's Q4_K_M).
    ``importance``: layer name -> imatrix (``bitplan.scoring.importance.collect_importance``),
    used to choose scales as ``llama-quantize --imatrix`` does. ``metadata_from``: the GGUF to
    copy metadata and tokenizer from (default: the file the model was loaded from).
    """
    config = source.module.config
    arch = gguf_architecture(config)  # first: a model it cannot write is refused for that
    metadata = _metadata(source, metadata_from)
    layout = tensor_layout(source, formats, embedding_type, output_type)
    importance = dict(importance or {})
    params = dict(source.module.named_parameters())
    writer = _write_index(path, arch, metadata, config, plan, layout)
    try:
        for t in layout:
            writer.write_tensor_data(_tensor_bytes(t, params[t.parameter], importance))
    finally:
        writer.close()
    notes = attention_notes(config, arch)
    return _report(path, path.stat().st_size, source, formats, layout, notes)


def gguf_file_bytes(
    model: object,
    plan: Plan,
    embedding_type: str | None = None,
    output_type: str | None = None,
    metadata_from: str | os.PathLike | None = None,
) -> int:
    """The exact size in bytes of the file ``export_model(model, plan, ..., "gguf")`` writes
    (with the same options), without quantizing anything: the metadata and tensor index are
    written to a temporary file and measured, and each tensor's data takes its stored bytes
    padded to the file's alignment, as the writer pads them."""
    source = ExportSource.of(model)
    config = source.module.config
    arch = gguf_architecture(config)
    metadata = _metadata(source, metadata_from)
    layout = tensor_layout(source, planned_formats(source, plan), embedding_type, output_type)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.gguf"
        writer = _write_index(path, arch, metadata, config, plan, layout)
        writer.close()
        index = path.stat().st_size
    pad = functools.partial(GGUFWriter.ggml_pad, n=writer.data_alignment)
    return pad(index) + sum(pad(t.nbytes) for t in layout)


def _metadata(source: ExportSource, metadata_from: str | os.PathLike | None) -> list:
    """The metadata to copy (tokenizer ...), from ``metadata_from`` or the model's own GGUF."""
    meta_path = Path(metadata_from) if metadata_from is not None else source.find_gguf()
    if meta_path is None:
        raise BitplanError(
            f"GGUF export copies the tokenizer and metadata from a GGUF file, and {source.name} "
            "was loaded from a Hugging Face folder; load the model from its .gguf (or use the "
            "embedded default), or pass metadata_from=<a .gguf of the same model>"
        )
    metadata = _source_metadata(meta_path)
    _check_tokenizer(metadata, source, meta_path)
    return metadata


def _write_index(
    path: Path, arch, metadata: list, config, plan: Plan, layout: list[GGUFTensor]
) -> GGUFWriter:
    """A writer on ``path`` that has written the header, the metadata and the tensor index: the
    caller writes the tensor data (or nothing) and closes it."""
    writer = GGUFWriter(path, arch.name)
    try:
        for key, value, vtype, sub_type in metadata:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        write_hyperparameters(writer, config, arch)
        writer.add_string(_PLAN_KEY, _plan_note(plan))
        for t in layout:
            rows = t.params // t.shape[-1]
            writer.add_tensor_info(
                t.name,
                (rows, t.nbytes // rows) if len(t.shape) == 2 else (t.nbytes,),
                np.dtype(np.uint8),
                t.nbytes,
                raw_dtype=GGMLQuantizationType[t.type_name],
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    except BaseException:
        writer.close()
        raise
    return writer


def is_bitplan_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file that bitplan wrote (its metadata holds the plan note)."""
    try:
        return _PLAN_KEY in GGUFReader(path).fields
    except Exception:  # not a GGUF, truncated, unreadable: not ours either way
        return False


BACKEND = Backend(
    "gguf", write_gguf, suffix=".gguf", is_own_file=is_bitplan_gguf, stores_rounded=False
)


def _plan_note(plan: Plan) -> str:
    return json.dumps(
        {
            "recipe": plan.recipe,
            "options": plan.options,
            "budget_avg_bits": plan.budget_avg_bits,
            "avg_bits": plan.avg_bits,
            "include_scales": plan.include_scales,
        }
    )


def _report(
    path: Path,
    file_bytes: int,
    source: ExportSource,
    formats: dict[str, Format],
    layout: list[GGUFTensor],
    notes: list[str] | None = None,
) -> ExportReport:
    counts: dict[str, int] = {}
    for t in layout:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    planned = [t for t in layout if t.layer is not None]  # a tied planned head counts once
    embedding = next(t for t in layout if t.name == "token_embd.weight")
    output = next((t for t in layout if t.name == "output.weight"), embedding)
    quantized = sum(t.nbytes for t in planned)
    dense = sum(t.nbytes for t in layout) - quantized
    return export_report(
        path,
        "gguf",
        source,
        formats,
        file_bytes=file_bytes,
        quantized_bytes=quantized,
        dense_bytes=dense,
        header_bytes=file_bytes - quantized - dense if file_bytes else 0,
        params=sum(t.params for t in layout),
        type_counts=counts,
        embedding_type=embedding.type_name,
        output_type=output.type_name,
        notes=notes or [],
    )


def gguf_size(
    model: object,
    plan: Plan,
    embedding_type: str | None = None,
    output_type: str | None = None,
) -> ExportReport:
    """The tensor bytes and bits per weight a GGUF export of ``model`` (a ``LoadedModel``)
    quantized with ``plan`` would have, without writing it (``file_bytes`` is 0: metadata is
    not counted)."""
    source = ExportSource.of(model)
    formats = planned_formats(source, plan)
    layout = tensor_layout(source, formats, embedding_type, output_type)
    return _report(Path(""), 0, source, formats, layout)
