"""PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bitplan.formats import parse_format  # noqa: E402
from bitplan.model.layers import LayerTable  # noqa: E402
from bitplan.plans import Plan  # noqa: E402


def plot_bits_per_layer(plans: Sequence[Plan], table: LayerTable, path: str | os.PathLike) -> None:
    """Bits per weight of every planned layer across depth, one panel per plan."""
    fig, axes = plt.subplots(len(plans), 1, figsize=(11, 2.4 * len(plans)), squeeze=False)
    planned = {name for plan in plans for name in plan.layer_formats}
    roles = sorted({layer.role for layer in table if layer.name in planned})
    colors = {role: plt.cm.tab10(i % 10) for i, role in enumerate(roles)}
    for ax, plan in zip(axes[:, 0], plans, strict=True):
        layers = [layer for layer in table if layer.name in plan.layer_formats]
        for x, layer in enumerate(layers):
            fmt = parse_format(plan.layer_formats[layer.name])
            bits = fmt.bits_per_weight(layer.shape, plan.include_scales)
            ax.bar(x, bits, color=colors[layer.role], width=1.0)
        budget = "" if plan.budget_avg_bits is None else f" budget {plan.budget_avg_bits:g},"
        ax.set_title(f"{plan.recipe}:{budget} achieved {plan.avg_bits:.3f} bits/weight", fontsize=9)
        ax.set_ylabel("bits/weight")
        blocks = [layer.block for layer in layers]
        ticks = [
            i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)
        ]
        ax.set_xticks(ticks[::2], [str(blocks[i]) for i in ticks[::2]], fontsize=7)
        ax.set_xlim(-0.5, len(layers) - 0.5)
    axes[-1, 0].set_xlabel("decoder block (layers in model order)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in roles]
    fig.legend(handles, roles, loc="upper right", ncol=len(roles), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
