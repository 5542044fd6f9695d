"""Reading bitplan's own exports (``packed`` and ``fake``) back into a fake-quantized model
(``bitplan.model.load_model`` opens them through here).

The result is what ``bitplan.quantization.apply_plan`` makes from the original model: every planned
layer a ``FakeQuantLinear`` holding the dequantized weight (never quantized a second time:
fake quantization is not idempotent) and quantizing its input when its format says so. Logits
equal the in-memory fake model's exactly when loaded in the same dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bitplan.errors import BitplanError
from bitplan.exporters.fake import CONFIG_KEY
from bitplan.exporters.folder import FORMAT_VERSION, PLAN_FILE
from bitplan.exporters.packed import QUANT_METHOD
from bitplan.exporters.shards import read_tensors
from bitplan.formats import Format, parse_format
from bitplan.quantization import FakeQuantLinear, replace_module


@dataclass
class ExportedModel:
    """A bitplan export read back: a fake-quantized module, its tokenizer, where it came from."""

    module: nn.Module
    tokenizer: object
    note: str  # e.g. "bitplan packed export of <model> (bitplan, 4.5000 bits)"


def export_kind(path: str | os.PathLike) -> str | None:
    """``"packed"`` or ``"fake"`` for a folder bitplan exported, else None (any other folder)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD:
        return "packed"
    record = config.get(CONFIG_KEY)
    if isinstance(record, dict) and record.get("export_format") == "fake":
        return "fake"
    return None


def _check_version(record: dict, path: Path) -> None:
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise BitplanError(
            f"{path} is a bitplan export of format version {version}; this bitplan reads "
            f"version {FORMAT_VERSION}"
        )


def fake_quant_linear(linear: nn.Linear, fmt: Format) -> FakeQuantLinear:
    """Wrap a Linear whose weight is *already* quantize-dequantized (unlike
    ``FakeQuantLinear.from_linear``, which quantizes it)."""
    new = FakeQuantLinear.__new__(FakeQuantLinear)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight = nn.Parameter(linear.weight.data, requires_grad=False)
    new.bias = linear.bias
    new.fmt = fmt
    return new


#: Changes a freshly built model the way bitplan's loader changed the model an export was
#: written from, so that the export's layer names exist in it (``bitplan.model.open`` passes
#: ``bitplan.model.moe.unfuse_experts``: one Linear per MoE expert projection).
Restructure = Callable[[nn.Module], object]


def _unchanged(module: nn.Module) -> None:
    return None


def _missing_layer(where: object, name: str) -> BitplanError:
    hint = ""
    if ".experts." in name:
        hint = " (an MoE export: open it with bitplan.model.load_model, which unfuses the experts)"
    return BitplanError(f"{where} names layer {name}, which its model does not have{hint}")


def _wrap_layers(module: nn.Module, formats: dict[str, Format]) -> None:
    modules = dict(module.named_modules())
    for name, fmt in formats.items():
        linear = modules.get(name)
        if isinstance(linear, nn.Embedding):  # a GGUF plan's: its table is all there is
            continue
        if not isinstance(linear, nn.Linear):
            raise _missing_layer("the export", name)
        replace_module(module, name, fake_quant_linear(linear, fmt))


def _load_packed(path: Path, dtype: torch.dtype, restructure: Restructure) -> nn.Module:
    config = AutoConfig.from_pretrained(path)
    record = config.quantization_config
    _check_version(record, path)
    del config.quantization_config  # ours, not a transformers quantizer's
    formats = {name: parse_format(fmt) for name, fmt in record["layers"].items()}
    with init_empty_weights():  # parameters on the meta device, buffers real
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    restructure(module)  # still empty: the stored tensors are placed below
    modules = dict(module.named_modules())

    stored = read_tensors(path)
    state: dict[str, torch.Tensor] = {}
    for name, fmt in formats.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise _missing_layer(path, name)
        shape = (linear.out_features, linear.in_features)
        parts = {part: stored.pop(f"{name}.{part}") for part in fmt.part_bits(shape)}
        state[f"{name}.weight"] = fmt.decode(parts, shape).to(dtype)
    for key, tensor in stored.items():
        state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise BitplanError(
            f"{path} holds tensors its model has no place for, e.g. {result.unexpected_keys[0]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        module.tie_weights()
    missing = [name for name, p in module.named_parameters() if p.is_meta]
    if missing:
        raise BitplanError(f"{path} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    _wrap_layers(module, formats)
    return module


def _load_fake(path: Path, dtype: torch.dtype, restructure: Restructure) -> nn.Module:
    module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    restructure(module)
    record = getattr(module.config, CONFIG_KEY)
    _check_version(record, path)
    formats = {name: parse_format(fmt) for name, fmt in record["layer_formats"].items()}
    _wrap_layers(module, formats)
    return module


def read_export(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    restructure: Restructure = _unchanged,
) -> ExportedModel:
    """Read a ``packed`` or ``fake`` export as a fake-quantized model, in eval mode on the CPU.

    ``restructure`` is applied to the model transformers builds before the export's layers are
    looked up in it (``Restructure``)."""
    path = Path(path).expanduser()
    kind = export_kind(path)
    if kind is None:
        raise BitplanError(f"{path} is not a bitplan packed or fake export")
    try:
        module = (_load_packed if kind == "packed" else _load_fake)(path, dtype, restructure)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, KeyError, OSError) as err:
        raise BitplanError(f"cannot load the bitplan {kind} export {path}: {err}") from err
    module.eval()
    note = f"bitplan {kind} export"
    plan_path = path / PLAN_FILE
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        note += f" of {plan.get('model')} ({plan.get('recipe')}, {plan.get('avg_bits'):.4f} bits)"
    return ExportedModel(module=module, tokenizer=tokenizer, note=note)
