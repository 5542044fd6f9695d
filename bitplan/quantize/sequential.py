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
from bitplan.quantize import FakeQuantLinear, apply_formats, apply_plan
from bitplan.quantize.gptq import Hessian, check_gptq_format, gptq_round
from bitplan.score.replay import record_block_inputs, run_block


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
) -> nn.Module:
    """A fake-quantized copy of ``model`` (layer name -> format, as ``apply_formats``) whose
    decoder layers are GPTQ-rounded on the calibration ``tokens`` (n_samples, seq_len); ``clip``
    searches each group's scales (``gptq.clipped_scales``), ``act_order`` rounds the columns
    by decreasing input energy and ``clip_weighted`` weights the scale search by it
    (``gptq.gptq_round``)."""
    resolved = {n: f if isinstance(f, Format) else parse_format(f) for n, f in formats.items()}
    for fmt in {f.name: f for f in resolved.values()}.values():
        if not isinstance(fmt, BF16Format):  # bf16 layers are only rounded to bf16
            check_gptq_format(fmt)  # before any work
    target = copy.deepcopy(model)
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
    for record in records:  # only block 0's input and every block's keyword arguments are used
        record.hidden, record.final_hidden = [], None
    for index, block in enumerate(tqdm(blocks, desc="GPTQ", disable=not progress)):
        prefix = f"{blocks_path}.{index}."
        planned = {
            name: module
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and prefix + name in in_blocks
        }
        views = {name: [input_view(in_blocks[prefix + name])] for name in planned}
        inputs = [(hidden[k], record.kwargs[index]) for k, record in enumerate(records)]
        hessians = collect_hessians(block, planned, views, inputs)
        for name, linear in planned.items():
            fmt = in_blocks[prefix + name]
            hessian = hessians[name][0].matrix
            rounded = gptq_round(
                linear.weight.data,
                hessian,
                fmt,
                damp=damp,
                clip=clip,
                act_order=act_order,
                clip_weighted=clip_weighted,
            )
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, FakeQuantLinear.from_linear(linear, fmt, rounded))
        with torch.no_grad():
            hidden = [
                run_block(block, hidden[k], record.kwargs[index])
                for k, record in enumerate(records)
            ]
    return target


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
    if rounding != "gptq":
        raise BitplanError(f"unknown rounding {rounding!r}; choose rtn or gptq")
    if tokens is None:
        raise BitplanError("GPTQ rounding needs calibration tokens")
    return gptq_model(model, plan.layer_formats, tokens, batch_size, progress=progress)


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
