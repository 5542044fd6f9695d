"""Which tensor of a GGUF file gets which llama.cpp type: the layout that the GGUF export writes
and that ``bitplan.quantization.gguf`` reproduces as a torch model.

Every planned layer is stored in the plan's llama.cpp type (formats ``q4_k``, ``q6_k`` ...; see
``bitplan/formats/gguf.py``, including llama.cpp's fallback for rows that a type's blocks do not
divide), the norms in F32, and the token embedding and output tensor in ``embedding_type`` /
``output_type`` (llama.cpp's defaults: Q6_K for the output, and for a token embedding tied to
it, falling back to Q8_0 on rows that 256 does not divide; Q4_K for an untied embedding) unless
the plan chooses them (``include_head``; an untied embedding is then a layer of the plan too).
Tensor names and transformations are the architecture's (``gguf_architectures.py``): in llama
files the q and k projections are stored in llama.cpp's rotary row order (the permutation
transformers' GGUF loader undoes), in Gemma's the norms shifted by one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from gguf import get_tensor_name_map

from bitplan.errors import BitplanError
from bitplan.exporters.gguf_architectures import gguf_architecture
from bitplan.exporters.source import ExportSource, planned_formats
from bitplan.formats import BF16Format, Format, parse_format
from bitplan.formats.gguf import GGML_TYPES, GGUFFormat
from bitplan.plans import Plan

#: llama.cpp's type for the output tensor (and a tied token embedding): Q6_K, or Q8_0 when the
#: rows do not divide into 256-blocks (``llama_tensor_get_type_impl``).
DEFAULT_OUTPUT_TYPE = "q6_k"
#: An untied token embedding: llama.cpp's Q4_K_M keeps it in the mix's base type.
DEFAULT_EMBEDDING_TYPE = "q4_k"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: where it comes from and how it is stored."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    parameter: str  # parameter name in the torch model
    shape: tuple[int, ...]  # torch shape (out, in) or (n,)
    type_name: str  # llama.cpp type stored, after fallback: "Q4_K", "Q5_0", "F32" ...
    fmt: Format  # the format it is quantized with (a GGUFFormat)
    heads: int | None  # q / k projections: heads to permute rows for; None otherwise
    layer: str | None  # the planned Linear layer it stores, if any
    offset: float = 0.0  # added to the values stored (Gemma's norms: llama.cpp scales by w)

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        rows = self.params // self.shape[-1]
        ggml_type = GGML_TYPES[self.type_name]
        return rows * self.shape[-1] // ggml_type.block_size * ggml_type.type_size

    def importance(self, importance: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The imatrix this tensor is quantized with: its planned layer's, or (an unplanned
        head) its own module's; none for norms and an untied embedding."""
        if len(self.shape) != 2:
            return None
        return importance.get(self.layer or self.parameter.rpartition(".")[0])


def _as_gguf_format(fmt: Format, where: str) -> GGUFFormat:
    if isinstance(fmt, GGUFFormat):
        return fmt
    if isinstance(fmt, BF16Format):
        return GGUFFormat("BF16")
    raise BitplanError(
        f"{where} is planned as {fmt.name}, which a GGUF file cannot hold; plan with GGUF "
        "formats (q2_k, q3_k, q4_k, q5_k, q6_k, q8_0, q4_0, ...)"
    )


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers -> llama.cpp row order of a q / k projection (convert_hf_to_gguf's
    ``permute``): within each head, the two rotary halves become interleaved pairs."""
    out = weight.shape[0]
    return (
        weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_layout(
    model: object,
    plan: Plan,
    embedding_type: str | None = None,
    output_type: str | None = None,
) -> list[GGUFTensor]:
    """Every tensor of the GGUF file of ``model`` (a ``LoadedModel`` or an ``ExportSource``)
    quantized with ``plan``, in file order, with its stored type."""
    source = ExportSource.of(model)
    return tensor_layout(source, planned_formats(source, plan), embedding_type, output_type)


def tensor_layout(
    source: ExportSource,
    formats: dict[str, Format],
    embedding_type: str | None = None,
    output_type: str | None = None,
) -> list[GGUFTensor]:
    """``gguf_layout`` for the formats of a plan already checked against the model."""
    module = source.module
    config = module.config
    arch = gguf_architecture(config)
    names = get_tensor_name_map(arch.arch, config.num_hidden_layers)
    planned = {layer: _as_gguf_format(fmt, layer) for layer, fmt in formats.items()}
    embed = module.get_input_embeddings()
    head = module.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    head_name = next((n for n, m in module.named_modules() if m is head), None)
    embed_name = next(n for n, m in module.named_modules() if m is embed)
    out_fmt = _as_gguf_format(parse_format(output_type or DEFAULT_OUTPUT_TYPE), "the output")
    if head_name in planned:
        out_fmt = planned[head_name]
    emb_fmt = out_fmt if tied else parse_format(embedding_type or DEFAULT_EMBEDDING_TYPE)
    emb_fmt = planned.get(embed_name, _as_gguf_format(emb_fmt, "the token embedding"))
    q_heads, k_heads = config.num_attention_heads, config.num_key_value_heads

    tensors = []
    for parameter, param in module.named_parameters():  # a tied head is listed once, as embed
        name = names.get_name(parameter, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BitplanError(f"no llama.cpp tensor name for {parameter}; cannot write it to GGUF")
        layer = parameter.rpartition(".")[0]
        shape = tuple(param.shape)
        # q / k rows (and biases) go in llama.cpp's rotary order.
        heads = {"q_proj": q_heads, "k_proj": k_heads}.get(layer.rpartition(".")[2])
        heads = heads if arch.interleaved_rope else None
        offset = 0.0
        if param.dim() == 1:
            fmt, layer = GGUFFormat("F32"), None
            offset = arch.norm_offset if parameter.endswith("norm.weight") else 0.0
        elif param is embed.weight:
            # A tied embedding is also the output: it takes a planned head's format.
            owner = head_name if tied else embed_name
            fmt, layer = emb_fmt, (owner if owner in planned else None)
        elif layer == head_name and layer not in planned:
            fmt, layer = out_fmt, None
        elif layer in planned:
            fmt = planned[layer]
        else:
            raise BitplanError(f"the plan does not cover {layer}; plan every decoder layer")
        type_name = fmt.tensor_type(shape) if len(shape) == 2 else fmt.type_name
        tensors.append(GGUFTensor(name, parameter, shape, type_name, fmt, heads, layer, offset))
    return tensors
