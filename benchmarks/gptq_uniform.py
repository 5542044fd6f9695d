"""GPTQ against round-to-nearest with every decoder layer in one format: held-out KL and
perplexity of each, and GPTQ's wall time (issue 17's sanity rows, before GPTQ reaches plans).

Calibration 16 x 256 tokens, held-out 8 x 512, as plan_quality.py.

    .venv/bin/python benchmarks/gptq_uniform.py [--model gemma3-270m] [--formats w4g128,mxfp4]
        [--compare-clip] [--compare-act-order] [--compare-clip-weighted]
"""

from __future__ import annotations

import argparse
import time

from bitplan.data.calibration import calibration_samples
from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.model import load_model
from bitplan.quantization import apply_formats
from bitplan.quantization.sequential import GPTQSettings, gptq_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundled model key or folder")
    parser.add_argument("--formats", default="w4g128,mxfp4,w3g128,w2g128")
    parser.add_argument(
        "--compare-clip",
        action="store_true",
        help="also GPTQ without its clipping search of the group scales (gptq.clipped_scales)",
    )
    parser.add_argument(
        "--compare-act-order",
        action="store_true",
        help="also GPTQ with activation order (columns by decreasing H diagonal, static groups)",
    )
    parser.add_argument(
        "--compare-clip-weighted",
        action="store_true",
        help="also GPTQ whose scale search weights each column by its input energy (H diagonal)",
    )
    args = parser.parse_args()
    model = load_model(args.model)
    tokens = calibration_samples(model.tokenizer, 16, 256)
    base = BaseLogits.compute(model.module, heldout_samples(model.tokenizer, 8, 512))
    layers = model.layers.decoder_layers()
    print(f"{model.identity} ({model.note}); base ppl {base.base_ppl:.2f}")
    variants = {"GPTQ": {}}  # name -> gptq_model's options
    if args.compare_clip:
        variants["GPTQ, no clip"] = {"clip": False}
    if args.compare_act_order:
        variants["GPTQ, act order"] = {"act_order": True}
    if args.compare_clip_weighted:
        variants["GPTQ, weighted clip"] = {"clip_weighted": True}
    if args.compare_act_order and args.compare_clip_weighted:
        variants["GPTQ, both"] = {"act_order": True, "clip_weighted": True}
    columns = [f"{v} {what}" for v in variants for what in ("KL", "÷ RTN", "ppl", "time (s)")]
    print("| format | RTN KL | RTN ppl | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (2 + len(columns)))
    for name in args.formats.split(","):
        formats = {layer.name: name for layer in layers}
        rtn = base.compare(apply_formats(model.module, formats))
        cells = [name, f"{rtn.kl:.4f}", f"{rtn.ppl:.2f}"]
        for options in variants.values():
            start = time.perf_counter()
            tuned_model = gptq_model(
                model.module, formats, tokens, progress=False, settings=GPTQSettings(**options)
            )
            seconds = time.perf_counter() - start
            tuned = base.compare(tuned_model)
            del tuned_model
            cells += [f"{tuned.kl:.4f}", f"{tuned.kl / rtn.kl:.2f}", f"{tuned.ppl:.2f}"]
            cells.append(f"{seconds:.0f}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
