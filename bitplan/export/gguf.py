"""Writing a plan as a GGUF file that llama.cpp runs, and running such a file in llama.cpp.

>>> report = export_gguf(model, plan, "model.gguf")  # every planned layer in its GGUF type
>>> print(report.summary())                            # whole-file bits per weight, by type
>>> fake = fake_quantize_gguf(model, plan)             # the same numbers as a torch model
>>> runner = LlamaCppModel("model.gguf")               # llama.cpp's logits, for KL / perplexity

The file holds the plan's llama.cpp type for every planned layer (formats ``q4_k``, ``q6_k`` ...;
see ``bitplan/formats/gguf.py``, including llama.cpp's fallback for rows that a type's blocks do
not divide), the norms in F32, and the token embedding and output tensor in ``embedding_type`` /
``output_type`` (llama.cpp's defaults: Q6_K for the output, and for a token embedding tied to
it, falling back to Q8_0 on rows that 256 does not divide; Q4_K for an untied embedding).

The tokenizer and the ``general.*`` keys are copied from the GGUF file the model was loaded from
(the embedded default model comes from one); llama.cpp's ``llama.*`` hyperparameters are written
from the model's config. Models loaded from a Hugging Face folder are refused for now, unless
``metadata_from`` names a GGUF with the same tokenizer. Only llama-architecture models
(Llama, SmolLM2, ...) are written. The q and k projections are stored with llama.cpp's rotary
row order (the inverse of the permutation transformers' GGUF loader undoes).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from gguf import (
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    get_tensor_name_map,
)
from torch import nn

from bitplan.errors import BitplanError
from bitplan.export.atomic import check_output_file
from bitplan.formats import BF16Format, Format, parse_format
from bitplan.formats.gguf import GGML_TYPES, GGUFFormat, quantize_rows
from bitplan.model.loading import (
    DEFAULT_MODEL_NAME,
    LoadedModel,
    cache_dir,
    default_gguf_path,
)
from bitplan.plans import Plan

#: llama.cpp's type for the output tensor (and a tied token embedding): Q6_K, or Q8_0 when the
#: rows do not divide into 256-blocks (``llama_tensor_get_type_impl``).
DEFAULT_OUTPUT_TYPE = "q6_k"
#: An untied token embedding: llama.cpp's Q4_K_M keeps it in the mix's base type.
DEFAULT_EMBEDDING_TYPE = "q4_k"
#: Keys not copied from the source GGUF (the writer sets the architecture; the file type of a
#: mixed file is left for llama.cpp to guess from its tensors).
_SKIPPED_KEYS = {"general.architecture", "general.file_type"}
_SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: where it comes from and how it is stored."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    source: str  # parameter name in the torch model
    shape: tuple[int, ...]  # torch shape (out, in) or (n,)
    type_name: str  # llama.cpp type stored, after fallback: "Q4_K", "Q5_0", "F32" ...
    fmt: Format  # the format it is quantized with (a GGUFFormat)
    heads: int | None  # q / k projections: heads to permute rows for; None otherwise
    layer: str | None  # the planned Linear layer it stores, if any

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        rows = self.params // self.shape[-1]
        ggml_type = GGML_TYPES[self.type_name]
        return rows * self.shape[-1] // ggml_type.block_size * ggml_type.type_size


@dataclass
class GGUFExport:
    """What an export wrote and how it adds up."""

    path: Path
    file_bytes: int
    tensor_bytes: int  # bytes of all tensor data (what the plan's accounting predicts exactly)
    params: int  # weights of every tensor in the file
    planned_bits: int  # bits of the planned layers (= the plan's accounting with scales)
    planned_params: int
    type_counts: dict[str, int] = field(default_factory=dict)  # stored type -> tensors
    embedding_type: str = ""
    output_type: str = ""

    @property
    def bits_per_weight(self) -> float:
        """Whole-file bits per weight, as llama.cpp prints it (tensor bytes x 8 / weights)."""
        return self.tensor_bytes * 8 / self.params

    @property
    def planned_bits_per_weight(self) -> float:
        return self.planned_bits / self.planned_params

    def summary(self) -> str:
        types = ", ".join(f"{name} x{n}" for name, n in sorted(self.type_counts.items()))
        return "\n".join(
            [
                f"wrote GGUF {self.path} ({self.file_bytes:,} bytes)",
                f"  tensors: {self.tensor_bytes:,} bytes for {self.params:,} weights = "
                f"{self.bits_per_weight:.4f} bits per weight (whole file; {types})",
                f"  planned layers: {self.planned_bits_per_weight:.4f} bits per weight; token "
                f"embedding {self.embedding_type}, output {self.output_type}",
            ]
        )


# ---------------------------------------------------------------------------------------------
# The layout: which tensor gets which type.


def _as_gguf_format(fmt: Format, where: str) -> GGUFFormat:
    if isinstance(fmt, GGUFFormat):
        return fmt
    if isinstance(fmt, BF16Format):
        return GGUFFormat("BF16")
    raise BitplanError(
        f"{where} is planned as {fmt.name}, which a GGUF file cannot hold; plan with GGUF "
        "formats (q2_k, q3_k, q4_k, q5_k, q6_k, q8_0, q4_0, ...)"
    )


def _permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers -> llama.cpp row order of a q / k projection (convert_hf_to_gguf's
    ``permute``): within each head, the two rotary halves become interleaved pairs."""
    out = weight.shape[0]
    return (
        weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_layout(
    model: LoadedModel,
    plan: Plan,
    embedding_type: str | None = None,
    output_type: str | None = None,
) -> list[GGUFTensor]:
    """Every tensor of the GGUF file for ``plan``, in file order, with its stored type."""
    module = model.module
    config = module.config
    if getattr(config, "model_type", None) not in _SUPPORTED_MODEL_TYPES:
        raise BitplanError(
            f"GGUF export supports llama-architecture models (Llama, SmolLM2, ...), not "
            f"{getattr(config, 'model_type', type(module).__name__)!r}"
        )
    n_blocks = config.num_hidden_layers
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, n_blocks)
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    planned = {}
    for layer, fmt_name in plan.layer_formats.items():
        if layer not in linears:
            raise BitplanError(
                f"the plan names layer {layer}, which {model.name} does not have; "
                "was it made for another model?"
            )
        planned[layer] = _as_gguf_format(parse_format(fmt_name), layer)
    embed = module.get_input_embeddings()
    head = module.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    head_name = next((n for n, m in linears.items() if m is head), None)
    out_fmt = _as_gguf_format(parse_format(output_type or DEFAULT_OUTPUT_TYPE), "the output")
    if head_name in planned:
        out_fmt = planned[head_name]
    emb_fmt = out_fmt if tied else parse_format(embedding_type or DEFAULT_EMBEDDING_TYPE)
    emb_fmt = _as_gguf_format(emb_fmt, "the token embedding")
    q_heads, k_heads = config.num_attention_heads, config.num_key_value_heads

    tensors = []
    for source, param in module.named_parameters():  # a tied head is listed once, as embed
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BitplanError(f"no llama.cpp tensor name for {source}; cannot write it to GGUF")
        layer = source.rpartition(".")[0]
        shape = tuple(param.shape)
        # q / k rows (and biases) go in llama.cpp's rotary order.
        heads = {"q_proj": q_heads, "k_proj": k_heads}.get(layer.rpartition(".")[2])
        if param.dim() == 1:
            fmt, layer = GGUFFormat("F32"), None
        elif param is embed.weight:
            # A tied embedding is also the output: it takes a planned head's format.
            fmt, layer = emb_fmt, (head_name if tied and head_name in planned else None)
        elif layer == head_name and layer not in planned:
            fmt, layer = out_fmt, None
        elif layer in planned:
            fmt = planned[layer]
        else:
            raise BitplanError(f"the plan does not cover {layer}; plan every decoder layer")
        type_name = fmt.tensor_type(shape) if len(shape) == 2 else fmt.type_name
        tensors.append(GGUFTensor(name, source, shape, type_name, fmt, heads, layer))
    return tensors


# ---------------------------------------------------------------------------------------------
# Metadata and tokenizer from the source GGUF.


def source_gguf(model: LoadedModel) -> Path | None:
    """The GGUF file ``model`` was loaded from, if any (the embedded default counts)."""
    source = Path(model.source)
    if source.suffix == ".gguf" and source.is_file():
        return source
    default_folder = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-bf16"
    if model.name == DEFAULT_MODEL_NAME and source.resolve() == default_folder.resolve():
        return default_gguf_path()
    return None


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


def _write_hyperparameters(writer: GGUFWriter, config) -> None:
    """llama.cpp's ``llama.*`` keys, from the model's own config (so they always describe the
    tensors written)."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise BitplanError(f"GGUF export does not handle {rope_type!r} rope scaling yet")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _check_tokenizer(metadata: list, model: LoadedModel, path: Path) -> None:
    tokens = next((value for key, value, *_ in metadata if key == "tokenizer.ggml.tokens"), None)
    vocab = model.module.config.vocab_size
    if tokens is None or len(tokens) != vocab:
        raise BitplanError(
            f"{path} has no tokenizer of {vocab} tokens; pass the GGUF the model came from "
            "as metadata_from"
        )


# ---------------------------------------------------------------------------------------------
# Quantizing and writing.


def _importance_for(tensor: GGUFTensor, importance: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The imatrix a tensor is quantized with: its planned layer's, or (an unplanned head) its
    own module's; none for norms and an untied embedding."""
    if len(tensor.shape) != 2:
        return None
    return importance.get(tensor.layer or tensor.source.rpartition(".")[0])


def _tensor_bytes(
    tensor: GGUFTensor, param: torch.Tensor, importance: Mapping[str, np.ndarray]
) -> np.ndarray:
    """The bytes stored for one tensor."""
    weight = param.detach().to("cpu", torch.float32)
    if tensor.heads is not None:
        weight = _permute_rows(weight, tensor.heads)
    data = quantize_rows(
        weight.reshape(-1, weight.shape[-1]).numpy(),
        tensor.type_name,
        _importance_for(tensor, importance),
    )
    return data.reshape(-1) if param.dim() == 1 else data


@contextmanager
def _atomic_file(path: Path, force: bool) -> Iterator[Path]:
    """A temporary file next to ``path``, renamed onto it on success and removed otherwise."""
    path = check_output_file(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_gguf(
    model: LoadedModel,
    plan: Plan,
    path: str | os.PathLike,
    embedding_type: str | None = None,
    output_type: str | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    metadata_from: str | os.PathLike | None = None,
    force: bool = False,
) -> GGUFExport:
    """Write ``model`` quantized with ``plan`` as one GGUF file that llama.cpp loads.

    ``importance``: layer name -> imatrix (mean squared input per column, see
    :func:`collect_importance`), used to choose scales as ``llama-quantize --imatrix`` does.
    ``metadata_from``: the GGUF to copy metadata and tokenizer from (default: the file the
    model was loaded from). Tensors are quantized and written one at a time; the file appears
    only when complete.
    """
    path = Path(path).expanduser()
    if path.suffix != ".gguf":
        raise BitplanError(f"a GGUF export is one file ending in .gguf, not {path}")
    meta_path = Path(metadata_from) if metadata_from is not None else source_gguf(model)
    if meta_path is None:
        raise BitplanError(
            f"GGUF export copies the tokenizer and metadata from a GGUF file, and {model.name} "
            "was loaded from a Hugging Face folder; load the model from its .gguf (or use the "
            "embedded default), or pass metadata_from=<a .gguf of the same model>"
        )
    metadata = _source_metadata(meta_path)
    _check_tokenizer(metadata, model, meta_path)
    layout = gguf_layout(model, plan, embedding_type, output_type)
    importance = dict(importance or {})
    params = dict(model.module.named_parameters())
    with _atomic_file(path, force) as tmp:
        writer = GGUFWriter(tmp, "llama")
        try:
            for key, value, vtype, sub_type in metadata:
                writer.add_key_value(key, value, vtype, sub_type=sub_type)
            _write_hyperparameters(writer, model.module.config)
            writer.add_string("bitplan.plan", _plan_note(plan))
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
            for t in layout:
                writer.write_tensor_data(_tensor_bytes(t, params[t.source], importance))
        finally:
            writer.close()
        file_bytes = tmp.stat().st_size
    return _report(path, file_bytes, layout)


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


def _report(path: Path, file_bytes: int, layout: list[GGUFTensor]) -> GGUFExport:
    counts: dict[str, int] = {}
    for t in layout:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    planned = [t for t in layout if t.layer is not None]  # a tied planned head counts once
    embedding = next(t for t in layout if t.name == "token_embd.weight")
    output = next((t for t in layout if t.name == "output.weight"), embedding)
    return GGUFExport(
        path=path,
        file_bytes=file_bytes,
        tensor_bytes=sum(t.nbytes for t in layout),
        params=sum(t.params for t in layout),
        planned_bits=sum(t.nbytes * 8 for t in planned),
        planned_params=sum(t.params for t in planned),
        type_counts=counts,
        embedding_type=embedding.type_name,
        output_type=output.type_name,
    )


def gguf_size(
    model: LoadedModel,
    plan: Plan,
    embedding_type: str | None = None,
    output_type: str | None = None,
) -> GGUFExport:
    """The tensor bytes and bits per weight a GGUF export of ``plan`` would have, without
    writing it (``file_bytes`` is 0: metadata is not counted)."""
    return _report(Path(""), 0, gguf_layout(model, plan, embedding_type, output_type))


@torch.no_grad()
def fake_quantize_gguf(
    model: LoadedModel,
    plan: Plan,
    embedding_type: str | None = None,
    output_type: str | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    llama_cpp_activations: bool = False,
) -> nn.Module:
    """A copy of ``model.module`` holding exactly the values the GGUF export stores (planned
    layers, token embedding and output tensor quantize-dequantized), for comparing with
    llama.cpp. Row permutations commute with row-wise quantization, so no permuting is needed.

    With ``llama_cpp_activations`` every Linear also rounds its input as llama.cpp's CPU
    matmul does for the weight's type (8-bit blocks: Q8_0 for Q4_0 ... Q8_0 and MXFP4, Q8_K for
    the k-quants; bf16 / f16 for those types), which leaves only summation-order differences.
    """
    importance = dict(importance or {})
    layout = gguf_layout(model, plan, embedding_type, output_type)
    module = copy.deepcopy(model.module)
    params = dict(module.named_parameters())
    stored_type: dict[int, str] = {}
    for t in layout:
        if len(t.shape) != 2:
            continue  # F32 norms are stored exactly
        param = params[t.source]
        param.data = t.fmt.quantize_weight(param.data, _importance_for(t, importance))
        stored_type[id(param)] = t.type_name
    if llama_cpp_activations:
        for linear in module.modules():
            if isinstance(linear, nn.Linear) and id(linear.weight) in stored_type:
                rounding = _ACTIVATION_ROUNDING.get(stored_type[id(linear.weight)])
                if rounding is not None:
                    linear.register_forward_pre_hook(_rounding_hook(rounding))
    return module


def _round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml-cpu's ``quantize_row_q8_0``: blocks of 32, fp16 scale amax / 127, ties to even."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = (amax / 127).half().float()
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def _round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q8_K_ref``: blocks of 256, scale from the signed largest value."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 256)
    index = blocks.abs().argmax(-1, keepdim=True)
    peak = blocks.gather(-1, index)
    inverse = torch.where(peak != 0, -127 / peak, torch.zeros_like(peak))
    codes = torch.round(inverse * blocks).clamp(max=127)
    scale = torch.where(peak != 0, 1 / inverse, torch.zeros_like(peak))
    return (codes * scale).reshape(x.shape)


def _round_to(dtype: torch.dtype):
    return lambda x: x.to(dtype).float()


#: llama.cpp's CPU ``vec_dot_type``: how a matmul rounds its activations for each weight type.
_ACTIVATION_ROUNDING = {
    **dict.fromkeys(["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"], _round_q8_0),
    **dict.fromkeys(["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"], _round_q8_k),
    "BF16": _round_to(torch.bfloat16),
    "F16": _round_to(torch.float16),
}


def _rounding_hook(rounding):
    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        return (rounding(x).to(x.dtype), *inputs[1:])

    return hook


# ---------------------------------------------------------------------------------------------
# Importance matrix (llama.cpp's imatrix) from calibration text.


@torch.no_grad()
def collect_importance(
    model: LoadedModel, tokens: torch.Tensor, batch_size: int = 4, include_head: bool = True
) -> dict[str, np.ndarray]:
    """Layer name -> mean over calibration tokens of each input column's square, for every
    decoder Linear (and the head): what ``llama-imatrix`` collects."""
    layers = model.layers.selected(include_head)
    modules = dict(model.module.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [modules[layer.name].register_forward_hook(hook_for(layer.name)) for layer in layers]
    try:
        for batch in torch.split(tokens, batch_size):
            model.module(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


# ---------------------------------------------------------------------------------------------
# Running a GGUF in llama.cpp.


class LlamaCppModel(nn.Module):
    """A GGUF file run by llama.cpp (``llama-cpp-python``), shaped like a causal LM for
    bitplan's evaluators: ``model(input_ids=...)`` returns an object with ``.logits``
    (float32, one row per position), so ``bitplan.evaluate.divergence.BaseLogits.compare``
    measures KL and perplexity as llama.cpp computes them."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None):
        super().__init__()
        try:
            import llama_cpp
        except ImportError as err:
            raise BitplanError(
                "running a GGUF needs llama-cpp-python (pip install llama-cpp-python==0.3.36)"
            ) from err
        self.path = Path(path)
        self.n_ctx = n_ctx
        self._llm = llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=min(n_ctx, 512),
            logits_all=True,
            n_threads=n_threads or max(1, min(4, os.cpu_count() or 1)),
            verbose=False,
        )
        # Evaluators look up a parameter for the device.
        self._device_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        rows = []
        for sequence in input_ids.tolist():
            if len(sequence) > self.n_ctx:
                raise BitplanError(f"sequence of {len(sequence)} tokens > n_ctx {self.n_ctx}")
            self._llm.reset()
            self._llm.eval(sequence)
            rows.append(torch.from_numpy(np.array(self._llm.scores[: len(sequence)], np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))

    def close(self) -> None:
        self._llm.close()
