"""How much of a plan's error is its activations' rounding: held-out KL of each plan with weights
and inputs rounded to nearest (what ``bitplan quantize`` writes), with the inputs alone rounded
(weights exact), and with the weights alone rounded (inputs exact). For formats that quantize
activations (MXFP4, MXFP8, NVFP4 ...).

The inputs-alone KL is what no weight rounding removes, GPTQ's and tuning's included (they
change the weights only): the floor under any rounding of that plan, up to what the weights can
learn to cancel (issue 17 measures how close tuning comes).

    .venv/bin/python benchmarks/activation_floor.py PLAN.json [PLAN.json ...] [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.model import load_model
from bitplan.plans import Plan
from bitplan.quantization import FakeQuantLinear, apply_plan, replace_module


def inputs_only(quantized: nn.Module, original: nn.Module) -> nn.Module:
    """``quantized`` (a fake model) with every rounded weight put back as it was."""
    model = copy.deepcopy(quantized)
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            module.weight.data = original.get_submodule(name).weight.data.clone()
    return model


def weights_only(quantized: nn.Module) -> nn.Module:
    """``quantized`` with plain Linear layers holding its rounded weights: inputs left exact."""
    model = copy.deepcopy(quantized)
    fakes = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name, fake in fakes:
        linear = nn.Linear(fake.in_features, fake.out_features, bias=fake.bias is not None)
        linear.weight, linear.bias = fake.weight, fake.bias
        replace_module(model, name, linear)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plans", nargs="+", help="plan files (bitplan search's output)")
    parser.add_argument("--model", default=None, help="bundled model key or folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    base = BaseLogits.compute(model.module, heldout_samples(model.tokenizer, 8, 512))
    print(f"{model.identity}; torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    print("| plan | weights and inputs | inputs only | weights only |\n|---|---:|---:|---:|")
    for path in args.plans:
        quantized = apply_plan(model.module, Plan.load(path))
        kls = [
            base.compare(variant).kl
            for variant in (
                quantized,
                inputs_only(quantized, model.module),
                weights_only(quantized),
            )
        ]
        print(f"| {path} | " + " | ".join(f"{kl:.4f}" for kl in kls) + " |", flush=True)


if __name__ == "__main__":
    main()
