"""Loading a causal language model from a Hugging Face folder or a .gguf file
(``bitplan/model/open.py`` chooses among these, the bundled models of ``bundled.py`` and
bitplan's own exports)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils.quantization_config import GgufConfig

from bitplan.atomic import atomic_folder
from bitplan.errors import BitplanError
from bitplan.model.fingerprint import model_fingerprint
from bitplan.model.layers import LayerTable, build_layer_table
from bitplan.model.moe import unfuse_experts

if TYPE_CHECKING:
    from bitplan.model.streaming import BlockLoader


@dataclass
class LoadedModel:
    """A model in memory with what bitplan needs to know about it."""

    module: PreTrainedModel
    tokenizer: object
    name: str  # short human name, e.g. "SmolLM2-135M-Instruct"
    source: str  # where it was loaded from (folder or file path)
    note: str = ""  # provenance worth printing next to results
    expert_grouping: str = "block"  # how MoE experts are grouped (see layers.EXPERT_GROUPINGS)
    # Reads a tensor by name, for weights still on the meta device (a streamed model's blocks).
    weight_reader: Callable[[str], torch.Tensor] | None = None
    # The GGUF a converted model came from (a bundled model's), found when first asked for.
    find_gguf: Callable[[], Path] | None = None
    # Loads one decoder block's weights at a time (``load_streaming``); None when all are loaded.
    block_loader: BlockLoader | None = None
    layers: LayerTable = field(init=False)
    _identity: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Fused 3-D expert weights become one Linear per expert projection, so that they can be
        # scored and quantized like any other layer.
        unfuse_experts(self.module)
        self.layers = build_layer_table(self.module, self.expert_grouping)

    @property
    def identity(self) -> str:
        """``name@fingerprint`` of the weights (computed once), for plans and score caches."""
        if self._identity is None:
            fingerprint = model_fingerprint(self.module, self.weight_reader)
            self._identity = f"{self.name}@{fingerprint}"
        return self._identity

    def source_gguf(self) -> Path | None:
        """The GGUF file the model was loaded from, if any (bundled models count)."""
        source = Path(self.source)
        if source.suffix == ".gguf" and source.is_file():
            return source
        return self.find_gguf() if self.find_gguf is not None else None


def convert_gguf_to_folder(gguf_path: Path, folder: Path) -> None:
    """Dequantize a GGUF file into a bf16 Hugging Face folder, atomically."""
    module, tokenizer = load_gguf_file(gguf_path, torch.bfloat16)
    try:
        with atomic_folder(folder) as tmp:
            module.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except BitplanError:
        if not (folder / "config.json").is_file():
            raise  # not another process's finished conversion (those are kept, as equal)


#: What transformers raises for a model file that is cut short, damaged or of another kind.
_UNREADABLE = (ValueError, KeyError, OSError, struct.error, SafetensorError)


def load_gguf_file(gguf_path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    """A .gguf file's model, dequantized into plain ``dtype`` tensors, and its tokenizer."""
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        module = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=dtype,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (*_UNREADABLE, NotImplementedError) as err:
        raise BitplanError(f"cannot load {gguf_path} as a causal language model: {err}") from err
    # The weights are now plain dense tensors: forget that they came from a GGUF.
    if hasattr(module.config, "quantization_config"):
        del module.config.quantization_config
    module.hf_quantizer = None
    return module, tokenizer


def load_folder(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    """A Hugging Face folder's model in ``dtype``, and its tokenizer."""
    try:
        module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except SafetensorError as err:
        raise BitplanError(
            f"cannot load {path}: a .safetensors file there is damaged or cut short ({err})"
        ) from None
    except _UNREADABLE as err:
        raise BitplanError(f"cannot load {path} as a causal language model: {err}") from err
    return module, tokenizer
