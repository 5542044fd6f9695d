"""GPTQ over a whole model, block by block (the model glue around ``gptq.py``).

Block i is rounded with the inputs it will really see: the calibration tokens' hidden states
after blocks 0..i-1 have already been quantized. Each block is run once on those inputs to
collect every planned layer's Hessian, its layers are GPTQ-rounded, and it is run again,
quantized, to give block i+1 its inputs. The block keyword arguments (rotary embeddings, masks)
come from one recorded pass of the unquantized model: they do not depend on the weights.

A layer whose format also quantizes activations takes its Hessian from the quantized inputs
Q(X), the ones its rounded weight will multiply. Layers outside the blocks (lm_head), and bf16
layers, are rounded to nearest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format
from bitplan.formats.bf16 import BF16Format
from bitplan.formats.block_scaled import RoundedWeight
from bitplan.model.layers import find_blocks
from bitplan.plans.plan import ROUNDINGS
from bitplan.quantization import (
    FakeQuantLinear,
    apply_formats,
    apply_plan,
    replace_module,
    rounded_weights,
)
from bitplan.quantization.gptq import Hessian, check_gptq_format, gptq_sweep
from bitplan.quantization.tune import TunableRounding, tune_block
from bitplan.scoring.replay import (
    check_one_attention,
    first_block_inputs,
    record_block_inputs,
    run_block,
)

if TYPE_CHECKING:
    from bitplan.model.streaming import BlockLoader

#: What block tuning brings each block's output close to: the unquantized block's output on the
#: same (already quantized) inputs, or the unquantized model's own hidden states after the block
#: (which also asks each block to undo what the blocks before it left).
TUNE_TARGETS = ("block", "model")
#: Tuning steps per block of ``rounding="tuned"`` (one batch of calibration sequences each).
TUNE_ITERS = 25


@dataclass
class GPTQSettings:
    """How ``gptq_model`` rounds: ``clip`` searches each group's scales
    (``gptq.clipped_scales``), ``act_order`` rounds the columns by decreasing input energy and
    ``clip_weighted`` weights the scale search by it (``gptq.gptq_round``). With ``tune_iters``
    > 0 each block's rounding is then tuned on the block's output for that many steps, one batch
    each (``tune.tune_block``; learning rate ``tune_lr``, by default 0.25 / ``tune_iters``),
    towards ``tune_target`` (``TUNE_TARGETS``)."""

    damp: float = 0.01
    clip: bool = True
    act_order: bool = False
    clip_weighted: bool = False
    tune_iters: int = 0
    tune_target: str = "model"
    tune_lr: float | None = None

    def __post_init__(self) -> None:
        if self.tune_target not in TUNE_TARGETS:
            raise BitplanError(
                f"tune_target must be one of {', '.join(TUNE_TARGETS)}, not {self.tune_target!r}"
            )

    @property
    def rounding(self) -> str:
        return "tuned" if self.tune_iters > 0 else "gptq"

    @classmethod
    def of(cls, rounding: str) -> GPTQSettings:
        """The defaults of ``rounding`` (``gptq`` or ``tuned``)."""
        if rounding not in ("gptq", "tuned"):
            raise BitplanError(f"{rounding!r} is not a rounding GPTQ does; use gptq or tuned")
        return cls(tune_iters=TUNE_ITERS if rounding == "tuned" else 0)


def gptq_model(
    model: nn.Module,
    formats: Mapping[str, Format | str],
    tokens: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    settings: GPTQSettings | None = None,
) -> nn.Module:
    """A fake-quantized copy of ``model`` (layer name -> format, as ``apply_formats``) whose
    decoder layers are GPTQ-rounded on the calibration ``tokens`` (n_samples, seq_len), block by
    block, as ``settings`` say (default: plain GPTQ)."""
    settings = settings or GPTQSettings()
    resolved = _resolved(formats, settings)
    target = copy.deepcopy(model)
    target.requires_grad_(False)  # tuning trains its own numbers, never the model's
    blocks_path, blocks = find_blocks(target)
    in_blocks = _in_blocks(resolved, blocks_path)
    apply_formats(target, {n: f for n, f in resolved.items() if n not in in_blocks}, inplace=True)
    with torch.no_grad():
        records = [record_block_inputs(target, batch) for batch in tokens.split(batch_size)]
    inputs = [(record.hidden[0], record.kwargs) for record in records]
    del records  # only block 0's input and every block's keyword arguments are used
    for _ in _round_blocks(blocks, blocks_path, in_blocks, inputs, settings, progress):
        pass  # each block is rounded in place, inside ``target``
    return target


def gptq_streamed(
    model: nn.Module,
    loader: BlockLoader,
    formats: Mapping[str, Format | str],
    tokens: torch.Tensor,
    keep: Callable[[dict[str, RoundedWeight]], object],
    batch_size: int = 4,
    progress: bool = True,
    settings: GPTQSettings | None = None,
) -> None:
    """``gptq_model`` for a streamed model (``load_streaming``), whose blocks stay on disk: each
    block is read by ``loader`` and rounded as a copy, and its rounded layers' codes and scales
    (layer name -> ``RoundedWeight``) are given to ``keep`` before the next block is read
    (``exporters.RoundedStore.add`` keeps them on disk for the export)."""
    settings = settings or GPTQSettings()
    resolved = _resolved(formats, settings)
    check_one_attention(model)
    blocks_path, blocks = find_blocks(model)
    in_blocks = _in_blocks(resolved, blocks_path)
    with torch.no_grad():
        records = [first_block_inputs(model, batch) for batch in tokens.split(batch_size)]
    # Every block gets the first block's keyword arguments (check_one_attention).
    inputs = [(record.hidden[0], record.kwargs * len(blocks)) for record in records]

    def read_blocks() -> Iterator[nn.Module]:
        for index in range(len(blocks)):
            block = copy.deepcopy(loader.load(index)).requires_grad_(False)
            loader.unload(index)
            yield block

    for index, block in _round_blocks(
        read_blocks(), blocks_path, in_blocks, inputs, settings, progress, len(blocks)
    ):
        prefix = f"{blocks_path}.{index}."
        keep({prefix + name: rounded for name, rounded in rounded_weights(block).items()})


def _resolved(formats: Mapping[str, Format | str], settings: GPTQSettings) -> dict[str, Format]:
    resolved = {n: f if isinstance(f, Format) else parse_format(f) for n, f in formats.items()}
    check_rounding_formats(settings.rounding, resolved.values())
    return resolved


def _in_blocks(formats: Mapping[str, Format], blocks_path: str) -> dict[str, Format]:
    """The planned layers GPTQ rounds: those inside the decoder blocks, bf16 ones excepted."""
    return {
        n: f
        for n, f in formats.items()
        if n.startswith(f"{blocks_path}.") and not isinstance(f, BF16Format)
    }


def _round_blocks(
    blocks: Iterable[nn.Module],
    blocks_path: str,
    in_blocks: Mapping[str, Format],
    inputs: list[tuple[torch.Tensor, list[dict]]],
    settings: GPTQSettings,
    progress: bool,
    total: int | None = None,
) -> Iterator[tuple[int, nn.Module]]:
    """Round the planned layers of each of ``blocks`` in turn, replacing them by
    ``FakeQuantLinear``s, and yield ``(index, block)`` once it is done. ``inputs`` are block 0's
    hidden states per calibration batch and each block's keyword arguments for that batch;
    block i is rounded on the outputs of the already-rounded blocks before it."""
    hidden = [h for h, _ in inputs]
    # The unquantized model's hidden states, block by block, when tuning aims at them.
    tuning = settings.tune_iters > 0
    reference = list(hidden) if tuning and settings.tune_target == "model" else None
    desc = "GPTQ + tuning" if tuning else "GPTQ"
    for index, block in enumerate(tqdm(blocks, desc=desc, total=total, disable=not progress)):
        prefix = f"{blocks_path}.{index}."
        planned = {
            name: module
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and prefix + name in in_blocks
        }
        views = {name: [input_view(in_blocks[prefix + name])] for name in planned}
        block_inputs = [(hidden[k], kwargs[index]) for k, (_, kwargs) in enumerate(inputs)]
        hessians = collect_hessians(block, planned, views, block_inputs)
        if reference is not None:  # every block, planned or not, while it is unquantized
            with torch.no_grad():
                reference = [
                    run_block(block, reference[k], kw) for k, (_, kw) in enumerate(block_inputs)
                ]
        swept = {
            name: gptq_sweep(
                linear.weight.data,
                hessians[name][0].matrix,
                in_blocks[prefix + name],
                damp=settings.damp,
                clip=settings.clip,
                act_order=settings.act_order,
                clip_weighted=settings.clip_weighted,
            )
            for name, linear in planned.items()
        }
        rounded = {name: result[0] for name, result in swept.items()}
        if tuning and planned:
            targets = reference
            if targets is None:  # the unquantized block's outputs on the same inputs
                with torch.no_grad():
                    targets = [run_block(block, h, kwargs) for h, kwargs in block_inputs]
            roundings = {
                name: TunableRounding(in_blocks[prefix + name], *swept[name]) for name in planned
            }
            rounded = tune_block(
                block, roundings, block_inputs, targets, settings.tune_iters, settings.tune_lr
            )
        for name, linear in planned.items():
            fake = FakeQuantLinear.from_linear(linear, in_blocks[prefix + name], rounded[name])
            replace_module(block, name, fake)
        with torch.no_grad():
            hidden = [run_block(block, h, kwargs) for h, kwargs in block_inputs]
        yield index, block


def check_rounding_formats(rounding: str, formats: Iterable[Format]) -> None:
    """Raise BitplanError, before any work, if a layer in one of ``formats`` cannot be rounded
    as ``rounding`` says (bf16 layers are only ever rounded to bf16)."""
    for fmt in {f.name: f for f in formats}.values():
        if rounding == "rtn" or isinstance(fmt, BF16Format):
            continue
        check_gptq_format(fmt)  # tuning starts from GPTQ and rounds whatever it rounds


def quantize_model(
    model: nn.Module,
    plan,
    rounding: str | None = None,
    tokens: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> nn.Module:
    """A fake-quantized copy of ``model`` under ``plan``, rounded as ``rounding`` says (default:
    the plan's own): ``rtn`` (``apply_plan``) or ``gptq`` (``gptq_model`` on calibration
    ``tokens``, which it then needs)."""
    rounding = rounding or plan.rounding
    if rounding == "rtn":
        return apply_plan(model, plan)
    if rounding not in ROUNDINGS:
        raise BitplanError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if tokens is None:
        raise BitplanError(f"{rounding} rounding needs calibration tokens")
    return gptq_model(
        model, plan.layer_formats, tokens, batch_size, progress, GPTQSettings.of(rounding)
    )


#: An input a Hessian is taken of: the layer's input X itself (None), or Q(X) under a format.
InputView = Format | None


def collect_hessians(
    block: nn.Module,
    modules: Mapping[str, nn.Linear],
    views: Mapping[str, Sequence[InputView]],
    inputs: Iterable[tuple[torch.Tensor, dict]],
) -> dict[str, list[Hessian]]:
    """Each layer's Hessian of each of its input ``views``, from one unhooked forward run of
    ``block`` per (hidden states, keyword arguments) in ``inputs``. ``modules`` are Linear layers
    inside ``block``, by any names; ``views`` lists, under the same names, which inputs to take:
    X (None) or Q(X) of a format that quantizes activations."""
    hessians = {name: [Hessian(modules[name].in_features) for _ in views[name]] for name in modules}

    def hook(name):
        def add(_module, args):
            x = args[0]
            for view, hessian in zip(views[name], hessians[name], strict=True):
                hessian.add(x if view is None else view.quantize_activation(x))

        return add

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for hidden, kwargs in inputs:
                run_block(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def input_view(fmt: Format) -> InputView:
    """The input a layer rounded to ``fmt`` multiplies: Q(X) if ``fmt`` quantizes activations."""
    return fmt if fmt.quantizes_activations else None
