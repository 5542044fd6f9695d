"""The files of an exported Hugging Face folder besides its weights: config.json (with the
export's own entries), the generation config, the tokenizer and the plan."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from bitplan.exporters.source import ExportSource
from bitplan.plans import Plan

#: Name of the plan file inside every folder export.
PLAN_FILE = "bitplan_plan.json"
#: Version of bitplan's own config entries (packed layout and fake-export record).
FORMAT_VERSION = 1


def model_dtype_name(dtypes: Iterable[torch.dtype]) -> str:
    """The config dtype for a folder whose unquantized tensors have ``dtypes``: float32 if any
    is float32 (so that a plain ``from_pretrained`` keeps them exact), else bfloat16."""
    return "float32" if torch.float32 in set(dtypes) else "bfloat16"


def write_config(folder: Path, source: ExportSource, dtype: str, untie: bool, extra: dict) -> None:
    """config.json (with ``extra`` entries added) and generation_config.json."""
    config = copy.deepcopy(source.module.config)
    config.architectures = [type(source.module).__name__]  # engines pick the model class by it
    if untie:
        config.tie_word_embeddings = False
    config.save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["dtype"] = dtype
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    generation = getattr(source.module, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def write_side_files(folder: Path, source: ExportSource, plan: Plan) -> None:
    """The tokenizer and the plan."""
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(folder)
    plan.save(folder / PLAN_FILE)
