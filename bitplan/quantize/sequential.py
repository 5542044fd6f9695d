"""GPTQ over a whole model, block by block (the model glue around ``gptq.py``).

Block i is rounded with the inputs it will really see: the calibration tokens' hidden states
after blocks 0..i-1 have already been quantized. Each block is run once on those inputs to
collect every planned layer's Hessian, its layers are GPTQ-rounded, and it is run again,
quantized, to give block i+1 its inputs. The block keyword arguments (rotary embeddings, masks)
come from one recorded pass of the unquantized model: they do not depend on the weights.

A layer whose format also quantizes activations takes its Hessian from the quantized inputs
Q(X), the ones its rounded weight will multiply. Layers outside the blocks (lm_head) are rounded
to nearest.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.formats import Format, parse_format
from bitplan.model.layers import find_blocks
from bitplan.quantize import FakeQuantLinear, apply_formats
from bitplan.quantize.gptq import Hessian, check_gptq_format, gptq_quantize
from bitplan.score.replay import record_block_inputs, run_block


def gptq_model(
    model: nn.Module,
    formats: Mapping[str, Format | str],
    tokens: torch.Tensor,
    batch_size: int = 4,
    damp: float = 0.01,
    progress: bool = True,
) -> nn.Module:
    """A fake-quantized copy of ``model`` (layer name -> format, as ``apply_formats``) whose
    decoder layers are GPTQ-rounded on the calibration ``tokens`` (n_samples, seq_len)."""
    resolved = {n: f if isinstance(f, Format) else parse_format(f) for n, f in formats.items()}
    for fmt in {f.name: f for f in resolved.values()}.values():
        check_gptq_format(fmt)  # before any work
    target = copy.deepcopy(model)
    blocks_path, blocks = find_blocks(target)
    in_blocks = {n: f for n, f in resolved.items() if n.startswith(f"{blocks_path}.")}
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
        hessians = _collect_hessians(block, planned, in_blocks, prefix, hidden, records, index)
        for name, linear in planned.items():
            fmt = in_blocks[prefix + name]
            rounded = gptq_quantize(linear.weight.data, hessians[name].matrix, fmt, damp=damp)
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, FakeQuantLinear.from_linear(linear, fmt, rounded))
        with torch.no_grad():
            hidden = [
                run_block(block, hidden[k], record.kwargs[index])
                for k, record in enumerate(records)
            ]
    return target


def _collect_hessians(block, planned, formats, prefix, hidden, records, index):
    """Every planned layer's Hessian from one unhooked run of ``block`` on its current inputs."""
    hessians = {name: Hessian(module.in_features) for name, module in planned.items()}

    def hook(name):
        fmt = formats[prefix + name]

        def add(_module, args):
            x = args[0]
            hessians[name].add(fmt.quantize_activation(x) if fmt.quantizes_activations else x)

        return add

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in planned.items()]
    try:
        with torch.no_grad():
            for k, record in enumerate(records):
                run_block(block, hidden[k], record.kwargs[index])
    finally:
        for handle in handles:
            handle.remove()
    return hessians
