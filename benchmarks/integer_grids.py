"""Every decoder layer rounded to nearest in one integer format, GPTQ's symmetric rule against
the full-range grid (``_fr``): held-out KL of each (8 x 512 tokens of the shipped held-out text).

    .venv/bin/python benchmarks/integer_grids.py [--model gemma3-270m]
"""

from __future__ import annotations

import argparse

import torch

from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.formats import parse_format
from bitplan.model import load_model

FORMATS = ("w4g128", "w4g128_fr", "w3g128", "w3g128_fr", "w2g128", "w2g128_fr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundled model key or folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    base = BaseLogits.compute(model.module, heldout_samples(model.tokenizer, 8, 512))
    decoder = model.layers.decoder_layers()
    layers = {layer.name: model.module.get_submodule(layer.name) for layer in decoder}
    original = {name: linear.weight.detach().clone() for name, linear in layers.items()}
    print(f"{model.identity}; torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    print("| format | KL | ppl |\n|---|---:|---:|")
    for name in FORMATS:
        fmt = parse_format(name)
        for layer, linear in layers.items():
            weight = fmt.quantize_weight(original[layer].float())
            linear.weight.copy_(weight.to(linear.weight.dtype))
        divergence = base.compare(model.module)
        print(f"| {name} | {divergence.kl:.4f} | {divergence.ppl:.2f} |", flush=True)


if __name__ == "__main__":
    main()
