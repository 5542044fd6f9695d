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
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format
from bitplan.formats.bf16 import BF16Format
from bitplan.model.layers import find_blocks
from bitplan.plans.plan import ROUNDINGS
from bitplan.quantization import FakeQuantLinear, apply_formats, apply_plan, replace_module
from bitplan.quantization.gptq import Hessian, check_gptq_format, gptq_sweep
from bitplan.quantization.tune import TunableRounding, tune_block
from bitplan.scoring.replay import record_block_inputs, run_block

#: What block tuning brings each block's output close to: the unquantized block's output on the
#: same (already quantized) inputs, or the unquantized model's own hidden states after the block
#: (which also asks each block to undo what the blocks before it left).
TUNE_TARGETS = ("block", "model")
#: Tuning steps per block of ``rounding="tuned"`` (one batch of calibration sequences each).
TUNE_ITERS = 25


def gptq_model(
    model: nn.Module,
    formats: Mapping[str, Format | str],
    tokens: torch.Tensor,
    batch_size: int = 4,
    damp: float = 0.01,
    progress: bool = True,
    clip: bool = True,
    act_order: bool = False,
    clip_weighted: bool = False,
    tune_iters: int = 0,
    tune_target: str = "model",
    tune_lr: float | None = None,
) -> nn.Module:
    """A fake-quantized copy of ``model`` (layer name -> format, as ``apply_formats``) whose
    decoder layers are GPTQ-rounded on the calibration ``tokens`` (n_samples, seq_len); ``clip``
    searches each group's scales (``gptq.clipped_scales``), ``act_order`` rounds the columns
    by decreasing input energy and ``clip_weighted`` weights the scale search by it
    (``gptq.gptq_round``). With ``tune_iters`` > 0 each block's rounding is then tuned on the
    block's output for that many steps, one batch each (``tune.tune_block``;
    learning rate ``tune_lr``, by default 0.25 / ``tune_iters``), towards ``tune_target``
    (``TUNE_TARGETS``)."""
    resolved = {n: f if isinstance(f, Format) else parse_format(f) for n, f in formats.items()}
    if tune_target not in TUNE_TARGETS:
        raise BitplanError(
            f"tune_target must be one of {', '.join(TUNE_TARGETS)}, not {tune_target!r}"
        )
    check_rounding_formats("tuned" if tune_iters > 0 else "gptq", resolved.values())
    target = copy.deepcopy(model)
    target.requires_grad_(False)  # tuning trains its own numbers, never the model's
    blocks_path, blocks = find_blocks(target)
    in_blocks = {
        n: f
        for n, f in resolved.items()
        if n.startswith(f"{blocks_path}.") and not isinstance(f, BF16Format)
    }
    apply_formats(target, {n: f for n, f in resolved.items() if n not in in_blocks}, inplace=True)
    with torch.no_grad():
        records = [record_block_inputs(target, batch) for batch in tokens.split(batch_size)]
    hidden = [record.hidden[0] for record in records]
    # The unquantized model's hidden states, block by block, when tuning aims at them.
    reference = list(hidden) if tune_iters > 0 and tune_target == "model" else None
    for record in records:  # only block 0's input and every block's keyword arguments are used
        record.hidden, record.final_hidden = [], None
    for index, block in enumerate(
        tqdm(blocks, desc="GPTQ + tuning" if tune_iters > 0 else "GPTQ", disable=not progress)
    ):
        prefix = f"{blocks_path}.{index}."
        planned = {
            name: module
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and prefix + name in in_blocks
        }
        views = {name: [input_view(in_blocks[prefix + name])] for name in planned}
        inputs = [(hidden[k], record.kwargs[index]) for k, record in enumerate(records)]
        hessians = collect_hessians(block, planned, views, inputs)
        if reference is not None:  # every block, planned or not, while it is unquantized
            with torch.no_grad():
                reference = [run_block(block, reference[k], kw) for k, (_, kw) in enumerate(inputs)]
        swept = {
            name: gptq_sweep(
                linear.weight.data,
                hessians[name][0].matrix,
                in_blocks[prefix + name],
                damp=damp,
                clip=clip,
                act_order=act_order,
                clip_weighted=clip_weighted,
            )
            for name, linear in planned.items()
        }
        rounded = {name: result[0] for name, result in swept.items()}
        if tune_iters > 0 and planned:
            targets = reference
            if targets is None:  # the unquantized block's outputs on the same inputs
                with torch.no_grad():
                    targets = [run_block(block, h, kwargs) for h, kwargs in inputs]
            roundings = {
                name: TunableRounding(in_blocks[prefix + name], *swept[name]) for name in planned
            }
            rounded = tune_block(block, roundings, inputs, targets, tune_iters, tune_lr)
        for name, linear in planned.items():
            fake = FakeQuantLinear.from_linear(linear, in_blocks[prefix + name], rounded[name])
            replace_module(block, name, fake)
        with torch.no_grad():
            hidden = [
                run_block(block, hidden[k], record.kwargs[index])
                for k, record in enumerate(records)
            ]
    return target


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
    tune_iters = TUNE_ITERS if rounding == "tuned" else 0
    return gptq_model(
        model, plan.layer_formats, tokens, batch_size, progress=progress, tune_iters=tune_iters
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
