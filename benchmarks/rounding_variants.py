"""One plan, rounded with several settings of ``gptq_model`` (GPTQ's options, block tuning's
steps, target and batch): held-out KL, perplexity and wall time of each. For choosing defaults
(issue 17); ``tuned_rounding.py`` measures the defaults end to end through the command line.

Calibration 16 x 256 tokens of the shipped text (``--n-samples`` changes the 16), held-out 8 x 512,
as the other benchmarks.

    .venv/bin/python benchmarks/rounding_variants.py PLAN.json \\
        '[{}, {"tune_iters": 25}, {"tune_iters": 25, "tune_target": "block"}]' [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import time

from bitplan.data.calibration import calibration_samples
from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.model import load_model
from bitplan.plans import Plan
from bitplan.quantization.sequential import GPTQSettings, gptq_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", help="a plan file (bitplan search's output)")
    parser.add_argument(
        "variants", help="a JSON list of GPTQSettings fields (and batch_size), one dict a variant"
    )
    parser.add_argument("--model", default=None, help="bundled model key or folder")
    parser.add_argument(
        "--n-samples", type=int, default=16, help="calibration sequences of 256 tokens (16)"
    )
    args = parser.parse_args()
    variants = json.loads(args.variants)
    plan = Plan.load(args.plan)
    model = load_model(args.model)
    tokens = calibration_samples(model.tokenizer, args.n_samples, 256)
    base = BaseLogits.compute(model.module, heldout_samples(model.tokenizer, 8, 512))
    print(
        f"{model.identity}; {args.plan}; {args.n_samples} x 256 calibration tokens; base ppl {base.base_ppl:.2f}"
    )
    print("| gptq_model options | KL | ppl | wall s |\n|---|---:|---:|---:|", flush=True)
    for options in variants:
        batch_size = options.pop("batch_size", 4)
        start = time.perf_counter()
        settings = GPTQSettings(**options)
        rounded = gptq_model(
            model.module, plan.layer_formats, tokens, batch_size, progress=False, settings=settings
        )
        seconds = time.perf_counter() - start
        divergence = base.compare(rounded)
        del rounded
        label = json.dumps({**options, "batch_size": batch_size})
        print(
            f"| {label} | {divergence.kl:.4f} | {divergence.ppl:.2f} | {seconds:.0f} |", flush=True
        )


if __name__ == "__main__":
    main()
