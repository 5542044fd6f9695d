"""The ``compressed-tensors`` export: the checkpoint format vLLM reads, written with the
compressed-tensors library's own config models and compressors.

Each planned layer gets a ``QuantizationScheme`` (weights, input activations, compression format)
and is compressed by the library's compressor for that format, from bitplan's fake-quantized
weight and bitplan's own scales, so that the codes are exactly bitplan's. Layers sharing a
scheme share a config group; unquantized Linear layers are listed in ``ignore``.

What can and cannot be represented (details in docs/EXPORT.md):

* integer ``w{b}g{g}`` / ``_asym`` / per-channel -> ``pack-quantized``; ``int8`` ->
  ``int-quantized`` with dynamic per-token int8 activations. compressed-tensors needs the group
  size to divide ``in_features``; bitplan's ragged last group (576 = 4 x 128 + 64) is stored with
  the group size ``gcd(in_features, g)`` and each scale repeated over the sub-groups it covers:
  the same weights exactly, more scale bytes than the plan counted (the report says how many).
* ``mxfp4`` / ``mxfp6`` / ``mxfp8`` -> ``mxfp4-pack-quantized`` / ``mxfp6-pack-quantized`` /
  ``mxfp8-quantized`` with dynamic MX activations; refused when ``in_features`` is not a multiple
  of 32 (a ragged MX block has no compressed-tensors form).
* ``fp8`` -> ``float-quantized`` (FP8_DYNAMIC); ``bf16`` layers stay dense (in ``ignore``).
* ``nvfp4`` is refused: bitplan's NVFP4 activations use a dynamic per-tensor scale, while
  compressed-tensors / vLLM need a calibrated static ``input_global_scale`` bitplan does not make.

A plan that gives two layers of one fusion group (q/k/v, gate/up) different formats is refused:
vLLM runs each group as one fused matmul with one scheme.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bitplan.errors import BitplanError
from bitplan.exporters.backend import Backend
from bitplan.exporters.folder import model_dtype_name, write_config, write_side_files
from bitplan.exporters.report import ExportReport, folder_report
from bitplan.exporters.shards import DEFAULT_SHARD_BYTES, ShardWriter, read_tensors
from bitplan.exporters.source import ExportSource
from bitplan.exporters.tensors import dense_tensors
from bitplan.formats import (
    BF16Format,
    Format,
    FP8Format,
    HandlerRegistry,
    Int8W8A8Format,
    IntFormat,
    MXFormat,
    NVFP4Format,
)
from bitplan.formats.integer import as_int_format
from bitplan.formats.minifloat import power_of_two
from bitplan.formats.mx import E8M0_BIAS, MX_BLOCK_SIZE
from bitplan.formats.packing import unpack_bits
from bitplan.plans import Plan

#: Formats whose layers stay dense (unquantized) in a compressed-tensors checkpoint.
_DENSE = "dense"


@dataclass(frozen=True)
class _LayerScheme:
    """How one layer is stored: a hashable key for grouping, and what to build the scheme from."""

    fmt: Format
    compression: str  # a compressed_tensors CompressionFormat value
    strategy: str  # group or channel
    group_size: int | None  # as stored
    expanded: bool = False  # ragged integer groups stored as smaller groups with repeated scales

    @property
    def label(self) -> str:
        return f"{self.fmt.name}_stored_as_g{self.group_size}" if self.expanded else self.fmt.name


def check_fusion_groups(source: ExportSource, formats: dict[str, Format]) -> None:
    """Refuse a plan whose layers of one fusion group would get different schemes."""
    for group, layers in source.layers.groups(include_head=True).items():
        if len(layers) < 2:
            continue
        chosen = {layer.name: _scheme_name(formats.get(layer.name)) for layer in layers}
        if len(set(chosen.values())) > 1:
            listing = ", ".join(f"{name.rsplit('.', 1)[-1]}={fmt}" for name, fmt in chosen.items())
            raise BitplanError(
                f"the plan splits fusion group {group} ({listing}); vLLM runs these layers as "
                "one fused matmul with one scheme, so they must share a format (plan with "
                "bitplan's fusion groups, or pin whole groups)"
            )


def _scheme_name(fmt: Format | None) -> str:
    return _DENSE if fmt is None or isinstance(fmt, BF16Format) else fmt.name


#: How compressed-tensors stores each kind of format: one handler per format type, each with
#: ``layer_scheme`` (how a layer is stored, or why it cannot be), ``quantization_scheme`` (the
#: library's config) and ``state`` (the tensors its compressor takes).
_HANDLERS: HandlerRegistry[type] = HandlerRegistry("compressed-tensors")


def layer_scheme(name: str, fmt: Format, in_features: int) -> _LayerScheme:
    """How layer ``name`` in ``fmt``, reading ``in_features`` inputs, is stored (its scheme and
    group size as written); a format the export cannot store is refused."""
    try:
        handler = _HANDLERS.lookup(fmt)
    except BitplanError as err:
        raise BitplanError(f"cannot export {name}: {err}") from None
    return handler.layer_scheme(name, fmt, in_features)


def _quantization_scheme(layer: _LayerScheme, targets: list[str]):
    scheme = _HANDLERS.lookup(layer.fmt).quantization_scheme(layer, targets)
    scheme.format = layer.compression
    return scheme


def _uncompressed_state(
    parts: dict[str, torch.Tensor], shape: tuple[int, int], layer: _LayerScheme
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The per-module state a compressor takes (fake-quantized weight, bitplan's scales in the
    stored group layout) from bitplan's stored ``parts``, and the fake-quantized weight itself."""
    fmt = layer.fmt
    fake = fmt.decode(parts, shape)
    return {"weight": fake, **_HANDLERS.lookup(fmt).state(parts, layer, shape)}, fake


@_HANDLERS.register(IntFormat, Int8W8A8Format)
class _IntegerHandler:
    """``w{b}g{g}`` / ``_asym`` / per-channel -> pack-quantized; ``int8`` (W8A8) ->
    int-quantized with dynamic per-token int8 activations."""

    @staticmethod
    def layer_scheme(name: str, fmt: IntFormat | Int8W8A8Format, in_features: int) -> _LayerScheme:
        compression = "int-quantized" if fmt.quantizes_activations else "pack-quantized"
        stored = fmt.even_group_size(in_features)
        if stored is None:  # one group per row
            return _LayerScheme(fmt, compression, "channel", None)
        return _LayerScheme(fmt, compression, "group", stored, expanded=stored != fmt.group_size)

    @staticmethod
    def quantization_scheme(layer: _LayerScheme, targets: list[str]):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        fmt = layer.fmt
        weights = QuantizationArgs(
            num_bits=fmt.bits,
            type="int",
            symmetric=fmt.symmetric,
            strategy=layer.strategy,
            group_size=layer.group_size,
            dynamic=False,
            scale_dtype=torch.float16,  # bitplan's scales are float16
        )
        inputs = None
        if fmt.quantizes_activations:  # int8 W8A8: dynamic per-token int8 activations
            inputs = QuantizationArgs(
                num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
            )
        return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)

    @staticmethod
    def state(
        parts: dict[str, torch.Tensor], layer: _LayerScheme, shape: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        fmt = layer.fmt
        scale = parts["scales"]  # float16, (out, ceil(in / g))
        if layer.expanded:
            # Ragged last group: every stored sub-group repeats the scale of the group it lies in.
            sub_groups = shape[1] // layer.group_size
            source = torch.arange(sub_groups) * layer.group_size // fmt.group_size
            scale = scale[:, source]
        else:
            source = None
        state = {"weight_scale": scale.contiguous()}
        if not fmt.symmetric:
            groups = parts["scales"].shape[1]
            zeros = unpack_bits(parts["zeros"], fmt.bits, shape[0] * groups).view(shape[0], groups)
            if source is not None:
                zeros = zeros[:, source]
            # compressed-tensors keeps signed codes: code - 2**(b-1), zero point likewise.
            state["weight_zero_point"] = (zeros - 2 ** (fmt.bits - 1)).to(torch.int8).contiguous()
        return state


@_HANDLERS.register(MXFormat)
class _MXHandler:
    """mxfp4 / mxfp6 / mxfp8 -> mxfp4-pack-quantized / mxfp6-pack-quantized / mxfp8-quantized,
    with dynamic MX activations; no ragged last block."""

    @staticmethod
    def layer_scheme(name: str, fmt: MXFormat, in_features: int) -> _LayerScheme:
        if in_features % MX_BLOCK_SIZE:
            raise BitplanError(
                f"cannot export {name} as compressed-tensors {fmt.name}: its {in_features} "
                f"inputs are not a multiple of the MX block of {MX_BLOCK_SIZE}, and "
                "compressed-tensors has no ragged last block"
            )
        compression = {4: "mxfp4-pack-quantized", 6: "mxfp6-pack-quantized"}.get(
            fmt.bits, "mxfp8-quantized"
        )
        return _LayerScheme(fmt, compression, "group", MX_BLOCK_SIZE)

    @staticmethod
    def quantization_scheme(layer: _LayerScheme, targets: list[str]):
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationScheme,
            preset_name_to_scheme,
        )

        fmt = layer.fmt
        if fmt.bits in (4, 8):
            return preset_name_to_scheme(f"MXFP{fmt.bits}", targets)

        # mxfp6: E2M3 weights and, as bitplan simulates, activations
        def mx6(**extra) -> QuantizationArgs:
            return QuantizationArgs(
                num_bits=6,
                type="float",
                strategy="group",
                group_size=MX_BLOCK_SIZE,
                symmetric=True,
                scale_dtype=torch.uint8,
                zp_dtype=torch.uint8,
                **extra,
            )

        return QuantizationScheme(
            targets=targets, weights=mx6(dynamic=False), input_activations=mx6(dynamic=True)
        )

    @staticmethod
    def state(
        parts: dict[str, torch.Tensor], layer: _LayerScheme, shape: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        exponent = parts["scales"].to(torch.int32) - E8M0_BIAS
        return {"weight_scale": power_of_two(exponent)}


@_HANDLERS.register(FP8Format)
class _FP8Handler:
    """fp8 -> float-quantized (FP8_DYNAMIC)."""

    @staticmethod
    def layer_scheme(name: str, fmt: FP8Format, in_features: int) -> _LayerScheme:
        return _LayerScheme(fmt, "float-quantized", "channel", None)

    @staticmethod
    def quantization_scheme(layer: _LayerScheme, targets: list[str]):
        from compressed_tensors.quantization import preset_name_to_scheme

        return preset_name_to_scheme("FP8_DYNAMIC", targets)

    @staticmethod
    def state(
        parts: dict[str, torch.Tensor], layer: _LayerScheme, shape: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        return {"weight_scale": parts["scales"].unsqueeze(-1)}


@_HANDLERS.register(NVFP4Format)
class _NVFP4Handler:
    """Refused (see the module doc); ``layer_scheme`` raises, so nothing else is asked of it."""

    @staticmethod
    def layer_scheme(name: str, fmt: NVFP4Format, in_features: int) -> _LayerScheme:
        raise BitplanError(
            f"cannot export {name} (nvfp4) as compressed-tensors: bitplan quantizes NVFP4 "
            "activations with a dynamic per-tensor scale, while compressed-tensors and vLLM need "
            "a calibrated static input_global_scale; use --format packed or fake"
        )


def _compressor(compression: str):
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(compression)


def _decompress(local: dict[str, torch.Tensor], scheme, exact_scales: bool) -> torch.Tensor:
    scale = local.get("weight_scale")
    if exact_scales and scale is not None and scale.dtype == torch.float16:
        # The library multiplies in the scale's dtype; float16 rounds code * scale to 11
        # significant bits. In float32 the product is exact, as in bitplan.
        local = {**local, "weight_scale": scale.float()}
    return _compressor(scheme.format).decompress(local, scheme)["weight"].float()


def write_compressed(
    source: ExportSource,
    plan: Plan,
    formats: dict[str, Format],
    folder: Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ExportReport:
    """Write the compressed-tensors export into ``folder``."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as err:  # pragma: no cover - a dependency of bitplan
        raise BitplanError(f"the compressed-tensors export needs that package: {err}") from err

    check_fusion_groups(source, formats)
    modules = dict(source.module.named_modules())
    quantized = {n: f for n, f in formats.items() if not isinstance(f, BF16Format)}
    layer_schemes = {
        name: layer_scheme(name, fmt, modules[name].in_features) for name, fmt in quantized.items()
    }
    targets: dict[_LayerScheme, list[str]] = {}
    for name, layer in layer_schemes.items():
        targets.setdefault(layer, []).append(name)
    schemes = {layer: _quantization_scheme(layer, names) for layer, names in targets.items()}

    shards = ShardWriter(folder, {"format": "pt"}, max_shard_bytes)
    shards.add_all(dense_tensors(source, skip={f"{name}.weight" for name in formats}))
    for name, fmt in formats.items():
        if name not in quantized:  # bf16 layers stay dense, with the fake model's bf16 weight
            shards.add(f"{name}.weight", fmt.encode(source.layer_weight(name))["weight"])
    kind_of: dict[str, str] = {}
    for name, layer in layer_schemes.items():
        scheme = schemes[layer]
        shape = tuple(modules[name].weight.shape)
        local, fake = _uncompressed_state(source.encoded(name, layer.fmt), shape, layer)
        compressed = _compressor(layer.compression).compress(local, scheme)
        if not torch.equal(_decompress(compressed, scheme, exact_scales=True), fake):
            raise BitplanError(
                f"compressed-tensors {layer.compression} does not reproduce {name}'s "
                f"{layer.fmt.name} weights exactly; not writing a checkpoint that differs"
            )
        for key, tensor in compressed.items():
            full = f"{name}.{key}"
            shards.add(full, tensor)
            kind_of[full] = _tensor_kind(key)
    shards.finish()

    compressions = {layer.compression for layer in targets}
    linear_names = [layer.name for layer in source.layers]
    config = QuantizationConfig(
        config_groups={layer.label: scheme for layer, scheme in schemes.items()},
        format=compressions.pop() if len(compressions) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=[name for name in linear_names if name not in quantized],
    )
    write_config(
        folder,
        source,
        dtype=model_dtype_name(d for k, d in shards.dtypes.items() if k not in kind_of),
        untie=source.head_name() in formats,
        extra={},
    )
    ModelCompressor(quantization_config=config).update_config(str(folder))
    write_side_files(folder, source, plan)
    notes = _notes(layer_schemes, compressed_tensors.__version__)
    return folder_report(folder, "compressed-tensors", source, formats, kind_of, notes)


BACKEND = Backend("compressed-tensors", write_compressed)


def _tensor_kind(key: str) -> str:
    if key in ("weight_packed", "weight"):
        return "codes"
    if key == "weight_zero_point":
        return "zero points"
    if key == "weight_shape":
        return "shapes"
    return "scales"


def _notes(layer_schemes: dict[str, _LayerScheme], version: str) -> list[str]:
    notes = [f"written with compressed-tensors {version}; vLLM loading is unchecked here"]
    expanded = {}
    for layer in layer_schemes.values():
        if layer.expanded:
            expanded[layer.label] = expanded.get(layer.label, 0) + 1
    for label, count in sorted(expanded.items()):
        notes.append(
            f"{count} layer(s) {label}: in_features is not a multiple of the group size, so "
            "each group's scale is repeated over gcd-sized sub-groups (same weights, more "
            "scale bytes than the plan counts)"
        )
    bits = {
        as_int_format(layer.fmt).bits
        for layer in layer_schemes.values()
        if as_int_format(layer.fmt)
    }
    if bits - {4, 8}:
        notes.append(
            f"{sorted(bits - {4, 8})}-bit integer layers are valid compressed-tensors, but "
            "vLLM's WNA16 kernels take 4 and 8 bits only (as far as we know)"
        )
    if any(as_int_format(layer.fmt) for layer in layer_schemes.values()):
        notes.append(
            "integer scales are stored in float16; an engine running in bfloat16 may round "
            "them (serve with dtype float16 to keep them exact)"
        )
    return notes


def decompress_export(
    path: str | os.PathLike, exact_scales: bool = True
) -> dict[str, torch.Tensor]:
    """Layer name -> float32 weight, decompressed by the compressed-tensors library from a
    checkpoint's config groups.

    With ``exact_scales`` float16 scales are widened to float32 before the library dequantizes
    (bit-exact bitplan weights); without, the library's own arithmetic is used as is.
    """
    from compressed_tensors.quantization import QuantizationConfig

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    quantization = QuantizationConfig.model_validate(config["quantization_config"])
    stored = read_tensors(path)
    weights = {}
    for scheme in quantization.config_groups.values():
        for target in scheme.targets:
            prefix = f"{target}."
            local = {
                key[len(prefix) :]: tensor
                for key, tensor in stored.items()
                if key.startswith(prefix) and key[len(prefix) :].startswith("weight")
            }
            weights[target] = _decompress(local, scheme, exact_scales)
    return weights
