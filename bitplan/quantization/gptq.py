"""GPTQ: rounding a layer's weight so that its output error on calibration inputs is small, not
each weight's own error (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers").

For a Linear layer with inputs X (one row per token), the output error of a rounded weight Q is
‖(W − Q) Xᵀ‖² = Σ_rows (w − q) H (w − q)ᵀ with H = XᵀX. GPTQ rounds the input columns one at a
time, left to right, and after each column moves the rounding error onto the columns not yet
rounded, in the proportions H⁻¹ says cancel it best (the optimal-brain-surgeon update). Done for
every row at once, with H⁻¹ in its upper Cholesky factor, in blocks of columns whose updates are
applied lazily ("lazy batch updates").

Any block-scaled format works the same way (``formats/block_scaled.py``): a group's scales are
chosen by the format's own rule (``find_scales``) when the sweep reaches the group's first
column, from the weights as the earlier columns' updates have left them; each column is then
rounded with its group's scales (``round``). So integer groups of any size (a ragged last group
too), MX blocks of 32, NVFP4 blocks of 16 (under the tensor's global scale, fixed before the
sweep: ``group_scale_rule``) and FP8 rows all take the same path.

``Hessian`` accumulates H from a layer's inputs; ``gptq_quantize`` rounds one weight with it.
The model glue (which inputs, in which order) lives apart from this algorithm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bitplan.errors import BitplanError
from bitplan.formats import Format
from bitplan.formats.block_scaled import BlockScaledFormat, BlockScales, RoundedWeight
from bitplan.formats.blocks import to_blocks


class Hessian:
    """H = 2 XᵀX / n of one layer's inputs, accumulated batch by batch (float32; n the number of
    input rows seen, so that H does not grow with the amount of calibration text)."""

    def __init__(self, in_features: int) -> None:
        self.matrix = torch.zeros(in_features, in_features)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs shaped ``(..., in_features)``."""
        x = inputs.detach().reshape(-1, self.matrix.shape[0]).float().cpu()
        total = self.rows + len(x)
        self.matrix *= self.rows / total
        x = x * (2.0 / total) ** 0.5
        with torch.autocast("cpu", enabled=False):  # in float32 even inside a bfloat16 pass
            self.matrix += x.T @ x
        self.rows = total


def check_gptq_format(fmt: Format) -> None:
    """Raise BitplanError unless GPTQ can round ``fmt``: a block-scaled format (GGUF's
    super-blocks are another layout)."""
    if not isinstance(fmt, BlockScaledFormat):
        raise BitplanError(f"GPTQ rounding is not available for {fmt.name} yet")


def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, **options
) -> RoundedWeight:
    """``weight`` (out, in) rounded onto ``fmt``'s grid by GPTQ with the inputs' ``hessian``
    (in, in): the elements and the scales chosen along the sweep, which exports store as they
    are (``RoundedWeight.values()`` is the dequantized weight). Options: :func:`gptq_sweep`."""
    return gptq_sweep(weight, hessian, fmt, **options)[0]


def gptq_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: Format,
    damp: float = 0.01,
    block_columns: int = 128,
    clip: bool = True,
    act_order: bool = False,
    clip_weighted: bool = False,
) -> tuple[RoundedWeight, torch.Tensor]:
    """GPTQ's rounding of ``weight`` (:func:`gptq_round`) and its latent weight: each weight as
    the sweep left it just before rounding it (float32, the weight's shape). Rounding the latent
    to nearest with the chosen scales gives the elements back; block tuning (``tune.py``) starts
    from it, where a small nudge flips the codes that were closest to a tie.

    ``damp`` times the mean of H's diagonal is added to the diagonal (H of real activations is
    often singular); inputs that are always zero (a zero diagonal) leave their columns' weights
    free, as in the reference implementation. ``block_columns`` is the width of the lazy
    updates (rounded to whole groups): it changes the speed, not the result (up to float
    rounding). ``clip`` chooses each group's scales by :func:`clipped_scales` instead of the
    format's own rule, for formats whose scales can be searched (``searches_scales``: not MX);
    on SmolLM2 it cut GPTQ's KL at w3g128 from 2.06 to 1.24 (docs/RESULTS.md).

    ``act_order`` sweeps the columns by decreasing H diagonal (the inputs with the most energy
    first, while the most columns remain to take their errors), with "static groups": every
    group's scales found before the sweep from the weight as it is, since a group's columns are
    then no longer rounded together. The groups stay the format's consecutive columns, so the
    result is stored like any other.

    ``clip_weighted`` weights each column's error in the scale search by H's diagonal (its
    input's energy), the part of the output error that the column's rounding alone causes."""
    check_gptq_format(fmt)
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())

    group = fmt.block_size(in_features)
    whole = to_blocks(w, group)
    # A group's scales on their own (NVFP4: under the tensor's global scale, fixed now).
    rule = fmt.group_scale_rule(whole)
    search = clip and fmt.searches_scales
    energy = h.diagonal().clone() if clip_weighted else None

    def find(blocks: torch.Tensor, columns: slice) -> BlockScales:
        if not search:
            return rule(blocks)
        weights = None if energy is None else to_blocks(energy[columns].unsqueeze(0), group)
        return clipped_scales(fmt, blocks, rule, weights)

    # Column ``order[k]`` of the weight is the k-th one rounded.
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    static = None
    if order is not None:
        static = find(whole, slice(None))
        w, h = w[:, order], h[order][:, order]
    # The upper Cholesky factor of H⁻¹: row j holds the OBS update of column j's error onto the
    # later columns, already conditioned on the earlier columns having been rounded.
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    upper = torch.linalg.cholesky(inverse, upper=True)

    # Blocks of whole groups, so that a group's scales see all of its columns up to date.
    width = group * max(1, block_columns // group)
    elements = torch.zeros_like(w)
    latent = torch.zeros_like(w)
    group_scales: list[BlockScales] = []
    for start in range(0, in_features, width):
        end = min(start + width, in_features)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        factor = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i if order is None else int(order[start + i])
            if static is not None:
                scales = static.select_block(column // group)
            elif i % group == 0:  # a group starts: its scales, from its weights as updated so far
                columns = slice(start + i, start + i + group)
                scales = find(to_blocks(block[:, i : i + group], group), columns)
                group_scales.append(scales)
            value = block[:, i : i + 1]
            element = fmt.round(value.unsqueeze(1), scales)
            elements[:, column : column + 1] = element.squeeze(1)
            latent[:, column : column + 1] = value
            rounded = scales.dequantize_(element).squeeze(1)
            error = (value - rounded) / factor[i, i]
            block[:, i:] -= error @ factor[i : i + 1, i:]
            errors[:, i : i + 1] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    scales = static if static is not None else _joined(group_scales)
    return RoundedWeight(elements, scales, group, method="gptq"), latent


#: The range shrink factors a clipping search tries (1: the format's own rule) and the norm of
#: the error it compares, as GPTQ's reference ``find_params(mse=True)``.
CLIP_SHRINKS = tuple(1 - 0.01 * k for k in range(21))
CLIP_NORM = 2.4


def clipped_scales(
    fmt: BlockScaledFormat,
    blocks: torch.Tensor,
    rule: Callable[[torch.Tensor], BlockScales] | None = None,
    weights: torch.Tensor | None = None,
) -> BlockScales:
    """Scales for float32 ``blocks`` (..., blocks, size): for each block, the scale ``rule``
    (default: the format's ``find_scales``) applied to the block's range shrunk by the factor
    of ``CLIP_SHRINKS`` that rounds it with the least error Σ|q − w|^``CLIP_NORM`` (each
    element's term times ``weights``, broadcast over the blocks, if given): the largest values
    clip so that the others are rounded finer. Any block-scaled format: the shrunk range goes
    through its own rule (an MX scale, a power of two, changes only where the shrink crosses
    one)."""
    rule = rule or fmt.find_scales
    best = rule(blocks)
    best_error = _rounding_error(fmt, blocks, best, weights)
    for shrink in CLIP_SHRINKS[1:]:
        scales = rule(blocks * shrink)
        error = _rounding_error(fmt, blocks, scales, weights)
        better = error < best_error
        best = BlockScales(
            torch.where(better, scales.scale, best.scale),
            None
            if best.zero_point is None
            else torch.where(better, scales.zero_point, best.zero_point),
            best.global_scale,  # fixed by the rule: the same for every shrink
        )
        best_error = torch.minimum(error, best_error)
    return best


def _rounding_error(
    fmt: BlockScaledFormat,
    blocks: torch.Tensor,
    scales: BlockScales,
    weights: torch.Tensor | None = None,
):
    error = (scales.dequantize_(fmt.round(blocks, scales)) - blocks).abs().pow(CLIP_NORM)
    return (error if weights is None else error * weights).sum(-1, keepdim=True)


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, **options
) -> torch.Tensor:
    """The quantize-dequantized ``weight`` of :func:`gptq_round` (same arguments), in
    ``weight``'s shape and dtype."""
    return gptq_round(weight, hessian, fmt, **options).values().to(weight.dtype)


def _joined(group_scales: list[BlockScales]) -> BlockScales:
    """The scales of every group of a row, one ``BlockScales`` per group joined in order."""

    def cat(field: str) -> torch.Tensor | None:
        parts = [getattr(scales, field) for scales in group_scales]
        return None if parts[0] is None else torch.cat(parts, dim=-2)

    return BlockScales(cat("scale"), cat("zero_point"), group_scales[0].global_scale)
