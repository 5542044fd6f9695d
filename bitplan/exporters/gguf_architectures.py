"""How llama.cpp reads each transformers architecture, as its own converter
(``convert_hf_to_gguf.py``) writes it: the GGUF architecture, which names the metadata keys
(``qwen2.block_count``) and the tensors (the ``gguf`` package's tensor map for it), the keys an
architecture adds to the common ones, and how tensors change on the way (q / k rows permuted for
llama.cpp's interleaved rotary embedding, Gemma's norm weights shifted by one).

One entry per transformers ``model_type`` in ``ARCHITECTURES``: adding an architecture is adding
an entry here and its model_type to ``bitplan.serving.GGUF_MODEL_TYPES`` (which ``--serve
llama.cpp`` checks before loading anything; a test keeps the two equal). docs/GGUF.md,
"Architectures", says what each one writes and how it is checked against llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType

from bitplan.errors import BitplanError
from bitplan.serving import check_gguf_architecture

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: The rope scalings whose llama.cpp keys are written (others need extra tensors or keys).
ROPE_TYPES = ("default", "linear")


def _nothing(*_: object) -> None:
    return None


@dataclass(frozen=True)
class GGUFArchitecture:
    """What llama.cpp needs of one transformers architecture."""

    arch: MODEL_ARCH  # llama.cpp's architecture: names the keys and the tensors
    # llama.cpp rotates adjacent pairs ("normal" rope, LLAMA) where transformers rotates halves:
    # q / k rows are permuted (convert_hf_to_gguf's ``LlamaModel.permute``). Others use NEOX.
    interleaved_rope: bool = False
    # Added to every norm weight: Gemma's RMSNorm scales by 1 + w, llama.cpp's by w.
    norm_offset: float = 0.0
    # llama.cpp's fixed sliding-window layout: every n-th layer attends to all tokens, the others
    # to the ``sliding_window`` last; None: every layer attends to all tokens.
    swa_pattern: int | None = None
    # The keys beyond the common ones (write_hyperparameters).
    extra_keys: Callable[[GGUFWriter, PretrainedConfig], None] = _nothing
    # Refuses a config that llama.cpp would compute otherwise (a one-line BitplanError).
    check: Callable[[PretrainedConfig], None] = _nothing

    @property
    def name(self) -> str:
        """The GGUF architecture name: ``general.architecture`` and the keys' prefix."""
        return MODEL_ARCH_NAMES[self.arch]


def head_dim(config: PretrainedConfig) -> int:
    """The attention head size (Phi-3 and Qwen2 configs leave it to hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config: PretrainedConfig, layer_type: str = "full_attention") -> dict:
    """The rope parameters of ``layer_type`` layers (transformers nests them per layer type where
    they differ, as in Gemma-3's local and global layers)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get(layer_type, rope)


def _gemma3_keys(writer: GGUFWriter, config: PretrainedConfig) -> None:
    writer.add_sliding_window(config.sliding_window)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _check_gemma3(config: PretrainedConfig) -> None:
    # llama.cpp's gemma3 (llama-model.cpp) fixes what transformers reads from the config:
    local = _rope(config, "sliding_attention")
    if local.get("rope_type", "default") != "default" or local.get("rope_theta") != 10000:
        raise BitplanError(
            "llama.cpp's gemma3 rotates the local layers with base 10000 and no scaling; this "
            f"model's are {local}"
        )
    # ... and scales attention by 1/sqrt(head_dim) (by 1/sqrt(hidden / heads) at 62 layers, 27B).
    scalar = head_dim(config)
    if config.num_hidden_layers == 62:
        scalar = config.hidden_size // config.num_attention_heads
    if config.query_pre_attn_scalar != scalar:
        raise BitplanError(
            f"llama.cpp's gemma3 scales attention by 1/sqrt({scalar}); this model's "
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar}"
        )
    if config.attn_logit_softcapping:
        raise BitplanError("llama.cpp's gemma3 has no attention logit soft-capping")


def _phi3_keys(writer: GGUFWriter, config: PretrainedConfig) -> None:
    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        writer.add_rope_scaling_orig_ctx_len(original)
    # convert_hf_to_gguf writes 0 for none (llama.cpp tells Phi-3 from Phi-4 by it).
    writer.add_sliding_window(config.sliding_window or 0)


#: transformers ``model_type`` -> how llama.cpp reads it (``convert_hf_to_gguf.py``'s classes).
ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(MODEL_ARCH.LLAMA, interleaved_rope=True),
    # convert_hf_to_gguf writes MistralForCausalLM as llama (LlamaModel), window and all.
    "mistral": GGUFArchitecture(MODEL_ARCH.LLAMA, interleaved_rope=True),
    "qwen2": GGUFArchitecture(MODEL_ARCH.QWEN2),  # q / k / v biases: F32 tensors of their own
    "qwen3": GGUFArchitecture(MODEL_ARCH.QWEN3),  # q / k norms: attn_q_norm, attn_k_norm
    # Fused projections stay fused: qkv_proj is attn_qkv, gate_up_proj is ffn_up (llama.cpp
    # splits them where it computes).
    "phi3": GGUFArchitecture(MODEL_ARCH.PHI3, extra_keys=_phi3_keys),
    # Gemma3ForCausalLM: sandwich norms (post_attention_norm, post_ffw_norm), q / k norms, the
    # embedding tied to the output and scaled by sqrt(hidden) in llama.cpp as in transformers.
    "gemma3_text": GGUFArchitecture(
        MODEL_ARCH.GEMMA3,
        norm_offset=1.0,
        swa_pattern=6,
        extra_keys=_gemma3_keys,
        check=_check_gemma3,
    ),
}


def gguf_architecture(config: PretrainedConfig) -> GGUFArchitecture:
    """How llama.cpp reads a model of ``config``; a one-line BitplanError if it cannot be
    written so that llama.cpp computes what the model computes."""
    model_type = getattr(config, "model_type", None)
    check_gguf_architecture(model_type)
    arch = ARCHITECTURES[model_type]
    layer_types = set(getattr(config, "layer_types", None) or ()) | {"full_attention"}
    for layer_type in sorted(layer_types):
        rope_type = _rope(config, layer_type).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise BitplanError(
                f"GGUF export does not write {rope_type!r} rope scaling yet ({model_type})"
            )
    arch.check(config)
    return arch


def write_hyperparameters(
    writer: GGUFWriter, config: PretrainedConfig, arch: GGUFArchitecture
) -> None:
    """llama.cpp's ``<arch>.*`` keys, from the model's own config (so they always describe the
    tensors written)."""
    rope = _rope(config)
    dim = head_dim(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_rope_dimension_count(int(dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    arch.extra_keys(writer, config)


def _windows(config: PretrainedConfig, arch: GGUFArchitecture | None = None) -> list[int | None]:
    """Each layer's attention window (None: all past tokens): the transformers model's, or, given
    ``arch``, llama.cpp's."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    if arch is None:  # transformers: per layer type, or one window for all (Mistral, Phi-3)
        types = getattr(config, "layer_types", None) or ["sliding_attention"] * n
        return [window if kind == "sliding_attention" else None for kind in types]
    if arch.swa_pattern is None:
        return [None] * n
    return [window if i % arch.swa_pattern < arch.swa_pattern - 1 else None for i in range(n)]


def _differing_layers(config: PretrainedConfig, arch: GGUFArchitecture) -> list[int]:
    return [
        i
        for i, (a, b) in enumerate(zip(_windows(config), _windows(config, arch), strict=True))
        if a != b
    ]


def exact_tokens(config: PretrainedConfig, arch: GGUFArchitecture) -> int | None:
    """Up to how many tokens llama.cpp computes what the model computes; None: at any length."""
    ours, theirs = _windows(config), _windows(config, arch)
    windows = [w for i in _differing_layers(config, arch) for w in (ours[i], theirs[i])]
    return min((w for w in windows if w is not None), default=None)


def attention_notes(config: PretrainedConfig, arch: GGUFArchitecture) -> list[str]:
    """What llama.cpp attends to otherwise than the model (sliding windows): written all the
    same, as llama.cpp's own converter writes it (Mistral-7B-v0.1's window is 4096 tokens)."""
    exact = exact_tokens(config, arch)
    if exact is None:
        return []
    layers = _differing_layers(config, arch)
    ours, theirs = _windows(config)[layers[0]], _windows(config, arch)[layers[0]]
    return [
        f"layers {layers} of this {config.model_type} attend to {ours or 'all'} past tokens, "
        f"llama.cpp's {arch.name} to {theirs or 'all'}: llama.cpp computes the model only on "
        f"sequences of up to {exact} tokens"
    ]
