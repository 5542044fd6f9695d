"""Mixture-of-experts blocks: fused 3-D expert weights turned into one nn.Linear per projection.

transformers stores a block's experts as two 3-D parameters (``gate_up_proj``: experts x 2I x H,
``down_proj``: experts x H x I) and loops over experts in its forward. bitplan quantizes, scores
and plans ``nn.Linear`` layers, so ``unfuse_experts`` replaces each such module with
``UnfusedExperts``: ``experts.<e>.<gate>/<up>/<down>`` as ordinary Linear layers, computing
exactly the same function. The three names are those of the architecture's checkpoints
(``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``/``w3``/``w2``), so that an export
holding the experts one by one is what transformers' loader fuses again.

Experts stored otherwise (transposed, interleaved, with biases or a gating function of their own,
as GPT-OSS's) are refused with an error naming the architecture: splitting them by the layout
above would compute another function, and leaving them out would quietly keep most of the
model's weights unquantized.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from bitplan.errors import BitplanError

#: Gate, up and down projection names of one expert, unless the checkpoints name them otherwise.
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")

# The flags transformers' ``@use_experts_implementation`` sets on an experts module, with the
# values of the one layout ``UnfusedExperts`` computes.
_SPLITTABLE_LAYOUT = {
    "is_transposed": False,
    "is_concatenated": True,  # gate rows then up rows, not interleaved
    "has_bias": False,
    "has_gate": True,
    "has_post_expert_norm": False,
}

# A checkpoint key of one expert's projection in transformers' conversion mapping:
# ".experts.*.w1.weight" -> "w1".
_EXPERT_SOURCE = re.compile(r"experts\.\*\.(\w+)\.weight$")


def expert_names(model_type: str) -> tuple[str, str, str]:
    """How ``model_type``'s checkpoints name one expert's gate, up and down projections, read from
    the mapping transformers applies when it fuses a checkpoint's experts on loading."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # no mapping to read: the usual names
        return DEFAULT_EXPERT_NAMES
    found: dict[str, list[str]] = {}
    for conversion in get_checkpoint_conversion_mapping(model_type) or []:
        sources = getattr(conversion, "source_patterns", [])
        leaves = [match[1] for source in sources if (match := _EXPERT_SOURCE.search(source))]
        for target in getattr(conversion, "target_patterns", []):
            if target.endswith("experts.gate_up_proj") and len(leaves) == 2:
                found["gate_up"] = leaves
            elif target.endswith("experts.down_proj") and len(leaves) == 1:
                found["down"] = leaves
    if set(found) != {"gate_up", "down"}:
        return DEFAULT_EXPERT_NAMES
    (gate, up), (down,) = found["gate_up"], found["down"]
    return gate, up, down


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free Linear holding a copy of ``weight`` in its dtype and on its device (the meta
    device too: the empty model an export is read into)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone())
    return linear


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its projections named by ``names``."""

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES,
    ):
        super().__init__()
        self.names = names
        for name, weight in zip(names, (gate, up, down), strict=True):
            self.add_module(name, _linear(weight))

    def forward(
        self, x: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        # Looked up by name at each call: apply_plan replaces the Linear layers in place.
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """A drop-in for transformers' fused experts module: same call, one Linear per projection."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES):
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        half = gate_up.shape[1] // 2
        super().__init__(
            ExpertMLP(gate_up[e, :half], gate_up[e, half:], down[e], names)
            for e in range(gate_up.shape[0])
        )
        self.num_experts = gate_up.shape[0]
        self.act_fn = fused.act_fn

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx], self.act_fn)
            y = y * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _holds_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` stores projections of several experts as 3-D parameters."""
    return any(
        param.dim() == 3 and name.endswith("_proj")
        for name, param in module.named_parameters(recurse=False)
    )


def _why_not_splittable(module: nn.Module) -> str | None:
    """Why ``UnfusedExperts`` cannot compute what ``module`` computes, or None when it can."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter):
        return "no gate_up_proj and down_proj pair"
    experts, hidden, intermediate = down.shape
    if gate_up.shape != (experts, 2 * intermediate, hidden):
        shapes = f"gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}"
        return f"{shapes}: not experts x 2I x H and experts x H x I"
    if not hasattr(module, "act_fn"):
        return "no act_fn"
    for flag, splittable in _SPLITTABLE_LAYOUT.items():
        if getattr(module, flag, splittable) != splittable:
            return f"{flag}={getattr(module, flag)}"
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return "a gating function of its own (_apply_gate)"
    return None


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that store several experts' projections as 3-D parameters."""
    return [(name, m) for name, m in model.named_modules() if _holds_fused_experts(m)]


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` in place; returns how many were replaced.

    Raises BitplanError, naming the architecture, for experts stored in another layout."""
    targets = fused_experts(model)
    if not targets:
        return 0
    for name, module in targets:
        reason = _why_not_splittable(module)
        if reason is not None:
            raise BitplanError(
                f"unsupported model {type(model).__name__}: its experts {name} "
                f"({type(module).__name__}) cannot be split into Linear layers ({reason}); bitplan "
                "splits experts stored as Qwen3-MoE's and Mixtral's are (gate_up_proj experts x "
                "2I x H, down_proj experts x H x I, act_fn(gate) * up)"
            )
    names = expert_names(getattr(getattr(model, "config", None), "model_type", ""))
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, UnfusedExperts(module, names))
    return len(targets)
