"""Tuning a block's rounding on the block's output, after GPTQ (SignRound's idea: Cheng et al.,
2023, "Optimize Weight Rounding via Signed Gradient Descent", as auto-round does it).

GPTQ rounds each layer alone, column by column, against that layer's own output error. At 2 bits
that leaves much on the table: the error that matters is the block's output, where the layers'
errors meet (through attention, the MLP's product, the norms). Here every planned layer of a
block gets two small sets of trainable numbers on top of its GPTQ result:

* an offset per weight in [-0.5, 0.5] added to its latent value (in units of its group's scale)
  before rounding, so a code can move to the other neighbour of its latent value: GPTQ's latent
  (``gptq.gptq_sweep``) is the starting point, and an offset of 0 gives GPTQ's codes back;
* a factor per group on GPTQ's scale, in [``SCALE_FACTOR_RANGE``].

They are fitted by signed gradient descent (each step moves every number by the learning rate
times its gradient's sign, the rate falling linearly to 0) on the squared error between the
block's output with the rounded weights and a target (``sequential.TUNE_TARGETS``; by default
the unquantized model's own hidden states after the block), rounding passing gradients straight
through. The numbers of the pass over the batches with the least summed error are kept.

Only integer formats tune their scales. MX scales are powers of two, and NVFP4's and FP8's follow
their own rules (a float8 block scale under a tensor scale), so for those formats the offsets
alone are tuned (in units of the block's scale, as auto-round's MX SignRound adds them) and the
scales stay as GPTQ chose them. On a minifloat grid an offset of up to half a scale unit moves a
weight to the other neighbour of its latent value where the grid is fine (FP4 below 2) and only
near a midpoint where it is coarse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bitplan.formats.block_scaled import (
    BlockScaledFormat,
    BlockScales,
    RoundedWeight,
    nonzero_or_one,
)
from bitplan.formats.blocks import from_blocks, to_blocks
from bitplan.formats.integer import IntegerWeights
from bitplan.quantization import quantized_input, replace_module
from bitplan.scoring.replay import run_block

#: How far tuning may move a group's scale from GPTQ's, as a factor.
SCALE_FACTOR_RANGE = (0.5, 1.25)


def _straight_through(exact: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``exact``'s value with ``x``'s gradient (for rounding, which has none)."""
    return x + (exact - x).detach()


class TunableRounding(nn.Module):
    """One layer's rounding with trainable offsets (and, for integer formats, scale factors;
    see the module doc)."""

    def __init__(self, fmt: BlockScaledFormat, start: RoundedWeight, latent: torch.Tensor) -> None:
        super().__init__()
        self.fmt = fmt
        self.length = latent.shape[-1]
        self.register_buffer("latent", to_blocks(latent.float(), start.block_size))
        self.register_buffer("start_scale", start.scales.scale.clone())
        zero_point = start.scales.zero_point
        self.register_buffer("zero_point", None if zero_point is None else zero_point.clone())
        self.register_buffer("global_scale", start.scales.global_scale)
        self.offset = nn.Parameter(torch.zeros_like(self.latent))
        self.tunes_scales = isinstance(fmt, IntegerWeights)
        factor = nn.Parameter(torch.ones_like(self.start_scale)) if self.tunes_scales else None
        self.register_parameter("scale_factor", factor)

    def scales(self) -> BlockScales:
        """The groups' scales, as their storage holds them (gradients pass through): an integer
        group's float16 scale times its factor, or GPTQ's scales as they are."""
        if not self.tunes_scales:
            return BlockScales(self.start_scale, self.zero_point, self.global_scale)
        scale = self.start_scale * self.scale_factor
        return BlockScales(_straight_through(scale.half().float(), scale), self.zero_point)

    def _elements(self, scales: BlockScales) -> torch.Tensor:
        """The elements (integer codes or minifloat values) as blocks, with rounding passing
        gradients straight through to the offsets (and the scale factors)."""
        if not self.tunes_scales:
            divisor = scales.divisor()
            with torch.no_grad():  # the format's own rounding, at the offset's latent value
                exact = self.fmt.round(self.latent + self.offset * divisor, scales)
            return _straight_through(exact, self.latent / divisor + self.offset)
        x = self.latent / nonzero_or_one(scales.scale) + self.offset
        codes = _straight_through(torch.round(x), x)
        if self.fmt.symmetric:
            return codes.clamp(-(2 ** (self.fmt.bits - 1)), 2 ** (self.fmt.bits - 1) - 1)
        return (codes + self.zero_point).clamp(0, 2**self.fmt.bits - 1)

    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), differentiable in the trainable numbers."""
        scales = self.scales()
        return from_blocks(scales.dequantize(self._elements(scales)), self.length)

    def clamp_(self) -> None:
        """Keep the trainable numbers in their ranges (after each step)."""
        with torch.no_grad():
            self.offset.clamp_(-0.5, 0.5)
            if self.scale_factor is not None:
                self.scale_factor.clamp_(*SCALE_FACTOR_RANGE)

    def rounded(self) -> RoundedWeight:
        """The tuned elements and scales, as exports store them."""
        with torch.no_grad():
            scales = self.scales()
            stored = BlockScales(
                scales.scale.detach().clone(), scales.zero_point, scales.global_scale
            )
            elements = from_blocks(self._elements(scales).detach(), self.length)
        return RoundedWeight(elements, stored, self.latent.shape[-1], method="tuned")


class TuningLinear(nn.Module):
    """A Linear whose weight is a :class:`TunableRounding`'s, recomputed on every forward."""

    def __init__(self, linear: nn.Linear, rounding: TunableRounding) -> None:
        super().__init__()
        self.rounding = rounding
        self.bias = linear.bias
        self.dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantized_input(self.rounding.fmt, x)
        return nn.functional.linear(x, self.rounding.weight().to(self.dtype), self.bias)


def tune_block(
    block: nn.Module,
    roundings: Mapping[str, TunableRounding],
    inputs: Sequence[tuple[torch.Tensor, dict]],
    targets: Sequence[torch.Tensor],
    iters: int,
    learning_rate: float | None = None,
) -> dict[str, RoundedWeight]:
    """Tune the ``roundings`` of ``block``'s Linear layers (by their names inside the block) so
    that the block's outputs on ``inputs`` (hidden states, keyword arguments: one batch each)
    come close to ``targets``. ``iters`` steps, one batch each, the batches in turn;
    ``learning_rate`` (default ``0.25 / iters``: 0.01 at 25 steps; auto-round's ``1 / iters``
    overshot on Gemma-3-270M, docs/RESULTS.md) falls linearly to 0. Returns every
    layer's rounding as it was on the pass over the batches whose summed error was least."""
    learning_rate = 0.25 / max(iters, 1) if learning_rate is None else learning_rate
    originals = {
        name: replace_module(block, name, TuningLinear(block.get_submodule(name), rounding))
        for name, rounding in roundings.items()
    }
    parameters = [p for rounding in roundings.values() for p in rounding.parameters()]
    best_error, best, pass_error = math.inf, None, 0.0
    try:
        for step in range(iters):
            (hidden, kwargs), target = inputs[step % len(inputs)], targets[step % len(inputs)]
            with torch.enable_grad():
                error = (run_block(block, hidden, kwargs).float() - target.float()).pow(2).mean()
                grads = torch.autograd.grad(error, parameters)
            pass_error += error.item()
            if step % len(inputs) == len(inputs) - 1:  # a pass ends, before its last update
                if pass_error < best_error:
                    best_error, best = pass_error, [p.detach().clone() for p in parameters]
                pass_error = 0.0
            rate = learning_rate * (1 - step / iters)
            with torch.no_grad():
                for parameter, grad in zip(parameters, grads, strict=True):
                    parameter.sub_(rate * grad.sign())
            for rounding in roundings.values():
                rounding.clamp_()
    finally:
        for name, original in originals.items():
            replace_module(block, name, original)
    if best is not None:
        with torch.no_grad():
            for parameter, value in zip(parameters, best, strict=True):
                parameter.copy_(value)
    return {name: rounding.rounded() for name, rounding in roundings.items()}
