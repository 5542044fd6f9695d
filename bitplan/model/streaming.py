"""Streaming: a model whose decoder blocks stay on the ``meta`` device until they are worked on.

``load_streaming`` builds the model with empty (meta) parameters and loads only what lies
outside the decoder blocks (embeddings, final norm, lm_head). ``BlockLoader.load(i)`` reads
block ``i``'s weights from the safetensors files onto a device and ``unload(i)`` drops them
again, so peak memory is about one block's weights plus its activations, not the whole model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bitplan.errors import BitplanError
from bitplan.jsonio import read_json_object
from bitplan.model.bundled import bundled_model
from bitplan.model.converted import CONVERTED_NOTE, converted_folder
from bitplan.model.hub import hub_model, looks_like_hub_id
from bitplan.model.layers import find_blocks
from bitplan.model.loading import LoadedModel
from bitplan.model.moe import fused_experts


def _tensor_names(file: Path) -> list[str]:
    """The tensors a safetensors file holds; a missing, cut short or damaged file is a one-line
    error (safetensors checks the header against the file's size)."""
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise BitplanError(f"cannot read {file}: {err}; is it complete?") from None


class SafetensorsStore:
    """Reads single tensors by name from a Hugging Face folder's safetensors file(s)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise BitplanError(f"cannot read {index}: {err}") from None
            self.file_of = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            self.file_of = dict.fromkeys(_tensor_names(folder / "model.safetensors"),
                                         folder / "model.safetensors")  # fmt: skip
        else:
            raise BitplanError(f"{folder} has no safetensors weights; streaming needs them")
        for file in set(self.file_of.values()) - {folder / "model.safetensors"}:
            _tensor_names(file)  # every shard's header read now: a damaged file fails here

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.file_of[name], framework="pt") as f:
            return f.get_tensor(name)


class BlockLoader:
    """Puts one decoder block's weights in memory (on ``device``) and takes them away again."""

    def __init__(self, model: nn.Module, store: SafetensorsStore, dtype: torch.dtype):
        self.model, self.store, self.dtype = model, store, dtype
        self.blocks_path, self.blocks = find_blocks(model)

    def load(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        block = self.blocks[index]
        prefix = f"{self.blocks_path}.{index}."
        for name, _ in list(block.named_parameters()):
            value = self.store.get(prefix + name).to(self.dtype)
            set_module_tensor_to_device(block, name, device, value=value)
        return block

    def unload(self, index: int) -> None:
        self.blocks[index].to("meta")


def _materialize_outside_blocks(
    model: nn.Module, store: SafetensorsStore, dtype: torch.dtype, blocks_path: str
) -> None:
    for name, param in list(model.named_parameters()):
        if name.startswith(blocks_path + ".") or not param.is_meta:
            continue
        if name in store:
            set_module_tensor_to_device(model, name, "cpu", value=store.get(name).to(dtype))
    model.tie_weights()  # a tied lm_head is not in the file: it shares the embedding's tensor
    missing = [
        n for n, p in model.named_parameters() if p.is_meta and not n.startswith(blocks_path + ".")
    ]
    if missing:
        raise BitplanError(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")


def load_streaming(
    source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LoadedModel, BlockLoader]:
    """Load a model for block-at-a-time work: everything outside the decoder blocks in memory,
    the blocks on the meta device until ``BlockLoader.load``. Needs a folder of safetensors
    (the embedded default is one once converted; a .gguf file is converted once into the
    cache, ``converted.py``)."""
    bundled = bundled_model(source)
    find_gguf = bundled.gguf_path if bundled is not None else None
    if bundled is not None:
        folder, name, note = bundled.ensure_folder(), bundled.name, bundled.note
    elif looks_like_hub_id(str(source)):
        folder, name, note = hub_model(str(source))
    elif (gguf := Path(source).expanduser()).suffix == ".gguf" and gguf.is_file():
        folder, name = converted_folder(gguf), gguf.stem
        note, find_gguf = CONVERTED_NOTE, lambda: gguf
    else:
        folder, name, note = Path(source).expanduser(), Path(source).name, ""
        if not (folder / "config.json").is_file():
            raise BitplanError(
                f"streaming needs a Hugging Face folder with config.json and safetensors; {folder} "
                "is not one (nor a .gguf file)"
            )
        read_json_object(folder / "config.json", "a model configuration")
    store = SafetensorsStore(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    module.eval()
    blocks_path, _ = find_blocks(module)
    # Fused 3-D experts only: a dense model's gate_up_proj Linear (Phi-3) streams like any other.
    if fused_experts(module):
        raise BitplanError(
            "streaming does not support mixture-of-experts models yet; drop --stream"
        )
    _materialize_outside_blocks(module, store, dtype, blocks_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loaded = LoadedModel(
        module=module,
        tokenizer=tokenizer,
        name=name,
        source=str(folder),
        note=note,
        weight_reader=store.get,
        find_gguf=find_gguf,
    )
    loaded.block_loader = BlockLoader(module, store, dtype)
    return loaded, loaded.block_loader
