"""Mixture-of-experts blocks: fused 3-D expert weights turned into one nn.Linear per projection.

transformers stores a block's experts as two 3-D parameters (``gate_up_proj``: experts x 2I x H,
``down_proj``: experts x H x I) and loops over experts in its forward. bitplan quantizes, scores
and plans ``nn.Linear`` layers, so ``unfuse_experts`` replaces each such module with
``UnfusedExperts``: ``experts.<e>.gate_proj / up_proj / down_proj`` as ordinary Linear layers,
computing exactly the same function.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        self.up_proj = nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate)
            self.up_proj.weight.copy_(up)
            self.down_proj.weight.copy_(down)


class UnfusedExperts(nn.ModuleList):
    """A drop-in for transformers' fused experts module: same call, one Linear per projection."""

    def __init__(self, fused: nn.Module):
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        half = gate_up.shape[1] // 2
        super().__init__(
            ExpertMLP(gate_up[e, :half], gate_up[e, half:], down[e])
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
            x = hidden_states[token_idx]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            y = y * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
        and hasattr(module, "act_fn")
    )


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` in place; returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if _is_fused_experts(m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, UnfusedExperts(module))
    return len(targets)
