"""What each serving engine can run: the rules behind ``--serve vllm|llama.cpp|transformers``.

A plan made for an engine uses only options the engine has a kernel for, in shapes it accepts,
and is exported in the engine's checkpoint format. Each rule is written once here, with where it
comes from, and checked three times: the options before the model is loaded
(:func:`check_options`), each fusion group's shapes when the plan space is built (an option an
engine cannot run for a group is taken out of that group's choices, :func:`layer_refusal`), and
the finished plan before an export writes anything (:func:`check_plan`). docs/EXPORT.md tabulates
the rules. None of them can be run against vLLM here (it needs a GPU): they are read from its
source at the revisions cited. The transformers rules are checked here by loading the exports
(tests/test_serving.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bitplan.errors import BitplanError
from bitplan.formats import BF16Format, Format, parse_format
from bitplan.formats.gguf import GGUFFormat
from bitplan.formats.integer import IntFormat
from bitplan.formats.mx import MXFormat
from bitplan.formats.nvfp4 import NVFP4Format

#: The engines ``--serve`` knows, and the export format each one reads.
SERVE_TARGETS = ("vllm", "llama.cpp", "transformers")
EXPORT_FORMATS = {
    "vllm": "compressed-tensors",
    "llama.cpp": "gguf",
    "transformers": "compressed-tensors",
}

_VLLM_WNA16 = "vLLM compressed_tensors_wNa16.py, WNA16_SUPPORTED_TYPES_MAP"
_VLLM_MARLIN_GROUPS = "vLLM marlin_utils.py, MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]"
_VLLM_SCHEMES = "vLLM compressed_tensors.py, _get_scheme_from_parts"
_VLLM_NVFP4 = "vLLM CompressedTensorsW4A4Fp4: input_global_scale loaded from the checkpoint"
_GGUF_TYPES = "a GGUF file stores ggml types only (bitplan/exporters/gguf_layout.py)"
_TRANSFORMERS_ASYM = "transformers 5 + compressed-tensors 0.20, observed here (docs/EXPORT.md)"


@dataclass(frozen=True)
class Rule:
    """One thing an engine needs, as docs/EXPORT.md lists it."""

    engine: str
    needs: str
    source: str
    enforced: str  # where bitplan checks it, or why it cannot


#: Every rule, for the documentation table (tests/test_serving.py checks the table lists them).
RULES = (
    Rule(
        "vllm",
        "integer weight-only layers have 4 or 8 bits",
        _VLLM_WNA16,
        "search (option refused), export",
    ),
    Rule(
        "vllm",
        "integer groups of 32, 64 or 128 weights, or one per row, as stored",
        _VLLM_MARLIN_GROUPS,
        "search (per fusion group: the stored group is gcd(in, g) when g does not divide in), "
        "export",
    ),
    Rule(
        "vllm",
        "asymmetric (zero point) integers: 4-bit everywhere, 8-bit only on Hopper (Machete)",
        "vLLM marlin_utils.py query_marlin_supported_quant_types; machete_utils.py",
        "noted at search and export (depends on the GPU)",
    ),
    Rule(
        "vllm",
        "no MXFP6 scheme in the compressed-tensors path",
        _VLLM_SCHEMES + " (no MXFP6 branch; inferred from source)",
        "search (option refused), export",
    ),
    Rule(
        "vllm",
        "MXFP4 activations are quantized (W4A4) only on SM100+ (FlashInfer); elsewhere it "
        "runs weight-only, so the served model differs from what bitplan measured",
        "vLLM PR #31926 (W4A16), PR #41664 (W4A4); issue #56770",
        "noted at search and export",
    ),
    Rule(
        "vllm",
        "NVFP4 activations need a calibrated static input_global_scale",
        _VLLM_NVFP4,
        "search (option refused); the export refuses it for every engine",
    ),
    Rule(
        "vllm",
        "fused q/k/v and gate/up layers share one scheme",
        "vLLM compressed_tensors/utils.py, should_ignore_layer: 'vLLM requires all to use the "
        "same scheme'; _match_fused_layer takes the first shard's scheme",
        "always: plans choose one format per fusion group; the export refuses a split group",
    ),
    Rule(
        "vllm",
        "which config group wins depends on their order when targets overlap",
        "llm-compressor PR #3028 review; compressed-tensors issue #862",
        "always: every layer is targeted by its exact name in exactly one group",
    ),
    Rule(
        "vllm",
        "MXFP4 layers read a multiple of 32 inputs",
        "vLLM CompressedTensorsW4A4Mxfp4.create_weights (input_size // 32 scales)",
        "the compressed-tensors export refuses it for every engine",
    ),
    Rule(
        "llama.cpp",
        "only ggml tensor types (q4_k, q6_k, q8_0 ...; bf16 as BF16)",
        _GGUF_TYPES,
        "search (option refused), export",
    ),
    Rule(
        "llama.cpp",
        "k-quant rows a multiple of 256, else llama-quantize stores a fallback type",
        "llama.cpp src/llama-quant.cpp, tensor_type_fallback",
        "always: bitplan's GGUF formats cost and store the fallback (docs/GGUF.md)",
    ),
    Rule(
        "llama.cpp",
        "bitplan writes GGUF files of llama, mistral, qwen2, qwen3, gemma3 and phi3 models",
        "bitplan/serving.py, GGUF_MODEL_TYPES (docs/GGUF.md, Architectures)",
        "search (before scoring), export",
    ),
    Rule(
        "transformers",
        "no asymmetric integer layers: its loading pass leaves zero points unpacked",
        _TRANSFORMERS_ASYM,
        "search (option refused), export; tests/test_serving.py loads the others",
    ),
    Rule(
        "transformers",
        "no GGUF types (transformers dequantizes a GGUF file on load)",
        _GGUF_TYPES,
        "search (option refused), export",
    ),
)


def check_target(engine: str | None) -> None:
    if engine is not None and engine not in SERVE_TARGETS:
        raise BitplanError(f"unknown --serve {engine!r}; choose one of {', '.join(SERVE_TARGETS)}")


def option_refusal(engine: str, fmt: Format) -> str | None:
    """Why ``engine`` cannot run ``fmt`` in any layer, with the rule's source; None if it can."""
    if isinstance(fmt, BF16Format):
        return None  # unquantized layers: every engine
    if engine == "llama.cpp":
        return None if isinstance(fmt, GGUFFormat) else f"{_GGUF_TYPES}: plan with q4_k, q6_k ..."
    if isinstance(fmt, GGUFFormat):
        return f"{fmt.name} is a llama.cpp type; serve it with --serve llama.cpp"
    if isinstance(fmt, NVFP4Format):
        return f"{_VLLM_NVFP4}, which bitplan does not produce"
    if engine == "vllm":
        if isinstance(fmt, IntFormat) and fmt.bits not in (4, 8):
            return f"vLLM's weight-only integer kernels take 4 or 8 bits ({_VLLM_WNA16})"
        if isinstance(fmt, MXFormat) and fmt.bits == 6:
            return f"vLLM has no MXFP6 scheme for compressed-tensors checkpoints ({_VLLM_SCHEMES})"
    if engine == "transformers" and isinstance(fmt, IntFormat) and not fmt.symmetric:
        return f"transformers cannot load asymmetric integer layers ({_TRANSFORMERS_ASYM})"
    return None


def layer_refusal(engine: str, fmt: Format, shape: tuple[int, int]) -> str | None:
    """Why ``engine`` cannot run a layer of ``shape`` (out, in) in ``fmt``; None if it can."""
    refusal = option_refusal(engine, fmt)
    if refusal is not None or engine != "vllm" or not isinstance(fmt, IntFormat):
        return refusal
    stored = fmt.even_group_size(shape[1])  # as compressed-tensors stores it; None: per row
    if stored is not None and stored not in (32, 64, 128):
        return (
            f"{fmt.name} reading {shape[1]} inputs is stored with groups of {stored}; vLLM's "
            f"kernels take 32, 64, 128 or one per row ({_VLLM_MARLIN_GROUPS})"
        )
    return None


def option_notes(engine: str, formats: Iterable[Format]) -> list[str]:
    """What serving ``formats`` on ``engine`` does otherwise than bitplan measured, or needs of
    the GPU."""
    notes = []
    for fmt in formats:
        if engine != "vllm":
            continue
        if isinstance(fmt, MXFormat) and fmt.bits == 4:
            notes.append(
                "vLLM quantizes MXFP4 activations only on SM100+ GPUs (FlashInfer); elsewhere "
                "mxfp4 layers run weight-only (PR #31926, #41664)"
            )
        if isinstance(fmt, IntFormat) and not fmt.symmetric and fmt.bits == 8:
            notes.append(f"vLLM runs {fmt.name} (8 bits with zero points) on Hopper GPUs only")
    return notes


def check_options(engine: str | None, formats: Iterable[Format]) -> None:
    """Refuse, before anything is loaded, an option ``engine`` cannot run in any layer."""
    check_target(engine)
    if engine is None:
        return
    for fmt in formats:
        refusal = option_refusal(engine, fmt)
        if refusal is not None:
            raise BitplanError(f"--serve {engine} cannot run {fmt.name}: {refusal}")


def check_model(engine: str | None, model_type: str | None) -> None:
    """Refuse a model the engine's export cannot write (bitplan's GGUF writer: GGUF_MODEL_TYPES)."""
    if engine == "llama.cpp":
        check_gguf_architecture(model_type)


#: The transformers model types whose GGUF files bitplan writes: the keys of
#: ``bitplan.exporters.gguf_architectures.ARCHITECTURES`` (kept here so that ``--serve`` checks a
#: model before the exporters are imported; tests/test_gguf_architectures.py keeps them equal).
GGUF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")


def check_gguf_architecture(model_type: str | None) -> None:
    """Refuse a model whose GGUF file bitplan cannot write (mixture-of-experts models among
    them)."""
    if model_type not in GGUF_MODEL_TYPES:
        raise BitplanError(
            f"GGUF export writes {', '.join(GGUF_MODEL_TYPES)} models (transformers model_type), "
            f"not {model_type!r}"
        )


def check_export_format(engine: str | None, export_format: str | None) -> None:
    """Refuse an export in another format than ``engine`` reads (and an unknown engine)."""
    check_target(engine)
    wanted = EXPORT_FORMATS.get(engine)
    if engine is not None and export_format is not None and export_format != wanted:
        raise BitplanError(f"--serve {engine} reads the {wanted} export, not {export_format}")


def check_plan(
    engine: str | None,
    layer_formats: Mapping[str, str],
    shapes: Mapping[str, tuple[int, int]] | None = None,
    export_format: str | None = None,
) -> list[str]:
    """Refuse a plan (layer -> format name) ``engine`` cannot run, or an export in another
    format than the engine reads; the notes worth printing otherwise. Without the layers'
    ``shapes`` (before the model is loaded) only the shape-free rules are checked."""
    check_export_format(engine, export_format)
    if engine is None:
        return []
    formats = {name: parse_format(name) for name in set(layer_formats.values())}
    for layer, name in layer_formats.items():
        if shapes is None:
            refusal = option_refusal(engine, formats[name])
        elif layer in shapes:  # (a layer not the model's: the export's own plan check says so)
            refusal = layer_refusal(engine, formats[name], shapes[layer])
        else:
            continue
        if refusal is not None:
            raise BitplanError(f"--serve {engine} cannot run {layer} in {name}: {refusal}")
    return option_notes(engine, formats.values())
