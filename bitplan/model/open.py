"""Opening anything bitplan takes as a model: a Hugging Face folder, a .gguf file, one of
bitplan's own exports (packed or fake: their formats are re-applied), a bundled model's key, or
nothing for the embedded default.

This is the one module that knows both plain models (``bitplan/model/loading.py``) and bitplan's
exports (``bitplan/exporters/load.py``); ``bitplan.exporters`` imports nothing from ``bitplan.model``,
so the two never import each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bitplan.errors import BitplanError
from bitplan.exporters.load import export_kind, read_export
from bitplan.jsonio import read_json_object
from bitplan.model.bundled import BUNDLED, bundled_model
from bitplan.model.converted import CONVERTED_NOTE, converted_folder
from bitplan.model.hub import hub_model, looks_like_hub_id
from bitplan.model.loading import LoadedModel, load_folder
from bitplan.model.moe import unfuse_experts


def load_model(
    source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a causal LM for bitplan.

    ``source`` is a Hugging Face folder (with ``config.json``; a bitplan packed or fake export
    is one), a Hub id read from the Hugging Face cache (``hub.py``), a ``.gguf`` file, a
    bundled model's key (``gemma3-270m``, ``smollm2-135m``: ``bitplan.model.bundled``), or
    ``None`` for the embedded default. A ``.gguf`` is converted once into a bf16 folder in the
    cache (``converted.py``). The model is put in eval mode on the CPU in ``dtype`` (float32 by
    default: CPU matmuls are fastest and exact-enough there).
    """
    note = ""
    bundled = bundled_model(source)
    if bundled is not None:
        path, name, note = bundled.ensure_folder(), bundled.name, bundled.note
    elif looks_like_hub_id(str(source)):
        path, name, note = hub_model(str(source))
    else:
        path = Path(source).expanduser()
        name = path.stem if path.suffix == ".gguf" else path.name
        if not path.exists():
            raise BitplanError(
                f"no model at {path}: give a Hugging Face folder (with config.json), a hub id "
                f"(owner/name), a .gguf file, a bundled model ({', '.join(BUNDLED)}) or nothing "
                "for the embedded default"
            )
    if path.is_file():
        if path.suffix != ".gguf":
            raise BitplanError(f"{path} is a file but not a .gguf; give a .gguf file or a folder")
        # Dequantized once into a bf16 folder in the cache, read from there ever after.
        module, tokenizer = load_folder(converted_folder(path), dtype)
        note = note or CONVERTED_NOTE
    else:
        if not (path / "config.json").is_file():
            raise BitplanError(f"{path} has no config.json; it is not a Hugging Face model folder")
        read_json_object(path / "config.json", "a model configuration")
        if export_kind(path) is not None:  # a bitplan packed/fake export: re-apply its formats
            return load_exported(path, dtype=dtype)
        module, tokenizer = load_folder(path, dtype)
    module.eval()
    return LoadedModel(
        module=module,
        tokenizer=tokenizer,
        name=name,
        source=str(path),
        note=note,
        find_gguf=bundled.gguf_path if bundled is not None else None,
    )


def load_exported(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a ``packed`` or ``fake`` export as a fake-quantized model, in eval mode on the CPU."""
    path = Path(path).expanduser()
    # An MoE export names one Linear per expert projection: unfuse the rebuilt model's experts.
    exported = read_export(path, dtype, restructure=unfuse_experts)
    return LoadedModel(
        module=exported.module,
        tokenizer=exported.tokenizer,
        name=path.name,
        source=str(path),
        note=exported.note,
    )
