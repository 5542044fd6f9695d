"""What every export writer shares: the plan's formats, the unquantized tensors, the folder's
config / tokenizer / plan files, and the size report."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.export.shards import weight_files
from bitplan.formats import Format, parse_format
from bitplan.model.loading import LoadedModel
from bitplan.plans import Plan

#: Name of the plan file inside every export.
PLAN_FILE = "bitplan_plan.json"
#: Version of bitplan's own config entries (packed layout and fake-export record).
FORMAT_VERSION = 1


@dataclass
class ExportReport:
    """What an export wrote, and how its size compares with the plan's bit accounting."""

    path: Path
    format: str  # fake, packed or compressed-tensors
    layers: int  # quantized (planned) layers
    weight_file_bytes: int  # bytes of the .safetensors file(s) on disk
    plan_bits: int  # exact bits of the planned layers by the plan's accounting (scales included)
    plan_bits_without_scales: int
    quantized_bytes: int  # tensor bytes of the planned layers (codes + scales + zero points)
    dense_bytes: int  # tensor bytes of everything else (embeddings, norms, unplanned layers)
    header_bytes: int  # safetensors headers
    bytes_by_kind: dict[str, int] = field(default_factory=dict)  # codes / scales / zero points
    notes: list[str] = field(default_factory=list)

    @property
    def plan_bytes(self) -> float:
        return self.plan_bits / 8

    def summary(self) -> str:
        """Lines for the command line."""
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in self.bytes_by_kind.items())
        lines = [
            f"wrote {self.format} export to {self.path}/",
            f"  weight file(s): {self.weight_file_bytes:,} bytes = quantized layers "
            f"{self.quantized_bytes:,} ({kinds}) + other tensors {self.dense_bytes:,} "
            f"+ headers {self.header_bytes:,}",
            f"  plan accounting for the {self.layers} quantized layers: {self.plan_bits:,} bits "
            f"= {self.plan_bits / 8:,.1f} bytes (without scales {self.plan_bits_without_scales:,}"
            " bits)",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def planned_formats(model: LoadedModel, plan: Plan) -> dict[str, Format]:
    """Layer name -> format for every layer of the plan, checked against the model."""
    modules = dict(model.module.named_modules())
    formats = {}
    for name, fmt_name in plan.layer_formats.items():
        module = modules.get(name)
        if module is None:
            raise BitplanError(
                f"the plan names layer {name}, which {model.name} does not have; "
                "was it made for another model?"
            )
        if not isinstance(module, nn.Linear):
            raise BitplanError(f"{name} is a {type(module).__name__}, not a Linear layer")
        formats[name] = parse_format(fmt_name)
    return formats


def head_name(model: LoadedModel) -> str | None:
    head = model.layers.head()
    return head.name if head is not None else None


def storage_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in bfloat16 when that is lossless (a float32 load of a bf16 checkpoint), else
    as it is: nothing unquantized is ever rounded on the way to disk."""
    tensor = tensor.detach()
    if tensor.is_floating_point() and tensor.dtype != torch.bfloat16:
        as_bf16 = tensor.to(torch.bfloat16)
        if torch.equal(as_bf16.to(tensor.dtype), tensor):
            return as_bf16
    return tensor.contiguous()


def read_tensor(model: LoadedModel, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values: from the model's weight reader if it is still on the meta device (a
    streamed model), else the tensor itself."""
    if tensor.is_meta:
        if model.weight_reader is None:
            raise BitplanError(f"{key} is not loaded (meta device) and the model has no reader")
        return model.weight_reader(key)
    return tensor.detach()


def dense_tensors(model: LoadedModel, skip: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict minus the ``skip`` keys, in storage dtypes, with one copy of each shared
    (tied) parameter (loaders re-tie what the config says is tied); one tensor at a time, so
    that a streamed model's tensors are read from disk only as they are written."""
    module = model.module
    aliases: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    dropped = set()
    for names in aliases.values():
        kept = [name for name in names if name not in skip][:1]
        dropped.update(name for name in names if name not in kept)
    for key, tensor in module.state_dict().items():
        if key not in skip and key not in dropped:
            yield key, storage_tensor(read_tensor(model, key, tensor))


def layer_weight(model: LoadedModel, name: str) -> torch.Tensor:
    """The weight of Linear layer ``name`` (read from disk if streamed)."""
    module = model.module.get_submodule(name)
    return read_tensor(model, f"{name}.weight", module.weight)


def model_dtype_name(dtypes: Iterable[torch.dtype]) -> str:
    """The config dtype for a folder whose unquantized tensors have ``dtypes``: float32 if any
    is float32 (so that a plain ``from_pretrained`` keeps them exact), else bfloat16."""
    return "float32" if torch.float32 in set(dtypes) else "bfloat16"


def write_config(folder: Path, model: LoadedModel, dtype: str, untie: bool, extra: dict) -> None:
    """config.json (with ``extra`` entries added) and generation_config.json."""
    config = copy.deepcopy(model.module.config)
    config.architectures = [type(model.module).__name__]  # engines pick the model class by it
    if untie:
        config.tie_word_embeddings = False
    config.save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["dtype"] = dtype
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    generation = getattr(model.module, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def write_side_files(folder: Path, model: LoadedModel, plan: Plan) -> None:
    """The tokenizer and the plan."""
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    plan.save(folder / PLAN_FILE)


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


def plan_bits(formats: dict[str, Format], model: LoadedModel) -> tuple[int, int]:
    """Exact bits of the planned layers, with and without scales."""
    shapes = {layer.name: layer.shape for layer in model.layers}
    modules = dict(model.module.named_modules())
    with_scales = without = 0
    for name, fmt in formats.items():
        shape = shapes.get(name)
        if shape is None:
            module = modules[name]
            shape = (module.out_features, module.in_features)
        with_scales += fmt.weight_bits(shape, include_scales=True)
        without += fmt.weight_bits(shape, include_scales=False)
    return with_scales, without


def build_report(
    folder: Path,
    final_path: Path,
    export_format: str,
    formats: dict[str, Format],
    model: LoadedModel,
    kind_of: dict[str, str],
    notes: list[str],
) -> ExportReport:
    """Size report of the weight file(s) in ``folder``; ``kind_of`` maps each quantized tensor's
    name to its kind (codes, scales, zero points, ...); the other tensors count as dense."""
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
    bits, bits_without = plan_bits(formats, model)
    return ExportReport(
        path=final_path,
        format=export_format,
        layers=len(formats),
        weight_file_bytes=sum(path.stat().st_size for path in files),
        plan_bits=bits,
        plan_bits_without_scales=bits_without,
        quantized_bytes=quantized,
        dense_bytes=dense,
        header_bytes=header,
        bytes_by_kind=by_kind,
        notes=notes,
    )
