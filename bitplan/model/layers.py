"""The layer table: every Linear that bitplan may quantize, with where it sits and what it fuses with.

Inference engines fuse some projections into one matmul (vLLM: q/k/v into ``qkv_proj``, gate/up
into ``gate_up_proj``), so those layers must share one format. A *fusion group* is such a set; a
plan chooses one format per group.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

from torch import nn

from bitplan.errors import BitplanError

# Last component of a module's name -> its role. Covers Llama, Mistral, Qwen2/3, Gemma, Phi-3 and
# Mixtral-style experts (w1 = gate, w3 = up, w2 = down).
_ROLE_BY_SUFFIX = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "qkv_proj": "qkv",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}

# Roles an engine fuses together -> name of the fused group.
_FUSED_ROLES = {
    "q": "qkv",
    "k": "qkv",
    "v": "qkv",
    "qkv": "qkv",
    "gate": "gate_up",
    "up": "gate_up",
}
_FUSED_ROLES["gate_up"] = "gate_up"

#: The order roles are listed in within a block.
ROLE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other")
ROLE_ORDER += ("lm_head", "embedding")  # outside the blocks


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable Linear layer (or, in a GGUF plan's table, an untied token embedding:
    ``LayerTable.as_gguf_tensors``)."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    block: int | None  # decoder block index (0 = nearest the embedding); None outside blocks
    role: str  # q, k, v, o, gate, up, down, qkv, gate_up, lm_head, embedding or other
    shape: tuple[int, int]  # (out_features, in_features), as the weight is stored; (rows, width)
    group: str  # fusion group name; layers of one group must share a format

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class EmbeddingInfo:
    """An input embedding table; never quantized by default."""

    name: str
    shape: tuple[int, int]
    tied_to_head: bool  # lm_head shares this weight

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class LayerTable:
    layers: tuple[LayerInfo, ...]  # decoder layers in model order, then lm_head if present
    # (then, in a GGUF plan's table, an untied token embedding)
    embeddings: tuple[EmbeddingInfo, ...]
    num_blocks: int
    blocks_path: str  # module path of the ModuleList holding the decoder blocks

    def decoder_layers(self) -> list[LayerInfo]:
        """The Linear layers inside decoder blocks: what the budget covers by default."""
        return [layer for layer in self.layers if layer.block is not None]

    def head(self) -> LayerInfo | None:
        return next((layer for layer in self.layers if layer.role == "lm_head"), None)

    def selected(self, include_head: bool = False) -> list[LayerInfo]:
        """Decoder layers, plus, when ``include_head``, those outside the blocks: lm_head (and
        an untied token embedding where the table lists one)."""
        outside = [layer for layer in self.layers if layer.block is None]
        return self.decoder_layers() + (outside if include_head else [])

    def groups(self, include_head: bool = False) -> dict[str, list[LayerInfo]]:
        """Fusion group name -> its layers, in model order."""
        out: dict[str, list[LayerInfo]] = {}
        for layer in self.selected(include_head):
            out.setdefault(layer.group, []).append(layer)
        return out

    def ungrouped(self) -> LayerTable:
        """The same layers, each in its own group (as a GGUF file stores them)."""
        return replace(self, layers=tuple(replace(layer, group=layer.name) for layer in self))

    def as_gguf_tensors(self) -> LayerTable:
        """What a plan for a GGUF file chooses for: each layer on its own (llama.cpp stores and
        runs every tensor apart), and an untied token embedding as one more, outside the blocks
        and so planned with the head (the file stores it in a type of its own; a tied one is
        lm_head's)."""
        untied = tuple(
            LayerInfo(e.name, None, "embedding", e.shape, e.name)
            for e in self.embeddings
            if not e.tied_to_head
        )
        table = self.ungrouped()
        return replace(table, layers=table.layers + untied)

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the largest list whose children all share one type."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise BitplanError(
            f"unsupported model {type(model).__name__}: no list of decoder blocks found"
        )
    return best[1], best[2]


# ".../experts.<e>.<leaf>": one projection of one expert of a mixture-of-experts block.
_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<leaf>[^.]+)$")

#: How experts of one MoE block are grouped: all together (engines want one scheme for a block's
#: experts) or by projection kind (gate/up apart from down).
EXPERT_GROUPINGS = ("block", "kind")


def expert_index(name: str) -> int | None:
    """The expert number of an MoE expert projection, None for any other layer."""
    match = _EXPERT.match(name)
    return int(match["index"]) if match else None


def _role_and_group(
    name: str, block_prefix: str | None, expert_grouping: str = "block"
) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    role = _ROLE_BY_SUFFIX.get(leaf, "other")
    expert = _EXPERT.match(name)
    if expert and block_prefix is not None:
        if expert_grouping == "block":
            return role, expert["experts"]
        kind = "down" if role == "down" else "gate_up"
        return role, f"{expert['experts']}.{kind}"
    fused = _FUSED_ROLES.get(role)
    if fused is None or block_prefix is None:
        return role, name
    return role, f"{parent}.{fused}"


def build_layer_table(model: nn.Module, expert_grouping: str = "block") -> LayerTable:
    """List every quantizable Linear of a causal LM, with block, role, shape and fusion group.

    Mixture-of-experts blocks must have their experts as Linear layers (``moe.unfuse_experts``);
    ``expert_grouping`` says whether a block's experts form one group ("block") or one per
    projection kind ("kind": gate/up, down)."""
    if expert_grouping not in EXPERT_GROUPINGS:
        raise BitplanError(
            f"expert grouping must be one of {', '.join(EXPERT_GROUPINGS)}, not {expert_grouping!r}"
        )
    blocks_path, blocks = find_blocks(model)
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None

    layers: list[LayerInfo] = []
    head: LayerInfo | None = None
    for index, block in enumerate(blocks):
        prefix = f"{blocks_path}.{index}"
        for sub_name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                name = f"{prefix}.{sub_name}"
                role, group = _role_and_group(name, prefix, expert_grouping)
                shape = (module.out_features, module.in_features)
                layers.append(LayerInfo(name, index, role, shape, group))
    if not layers:
        raise BitplanError(
            f"unsupported model {type(model).__name__}: no nn.Linear layers inside its decoder "
            "blocks (bitplan quantizes Linear layers)"
        )
    for name, module in model.named_modules():
        if module is head_module and isinstance(module, nn.Linear):
            shape = (module.out_features, module.in_features)
            head = LayerInfo(name, None, "lm_head", shape, name)
            break

    embeddings = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module is embed_module:
            tied = head_module is not None and head_module.weight is module.weight
            embeddings.append(EmbeddingInfo(name, tuple(module.weight.shape), tied))
    all_layers = tuple(layers + ([head] if head else []))
    return LayerTable(all_layers, tuple(embeddings), len(blocks), blocks_path)
