"""Plans from measured scores: for each fusion group, the calibration KL with that group in
MXFP4 and every other group in MXFP8, minus the all-MXFP8 KL (one evaluation per group: 120 on
the default model, about 12 minutes on 2 cores).

    .venv/bin/python benchmarks/estimator_limits/measured_scores.py
"""

from __future__ import annotations

import argparse

from common import add_model_argument, calibration_base, plan_kls, setup

from bitplan.quantization import apply_formats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(parser)
    args = parser.parse_args()
    model, tokens, heldout = setup(args.model)
    calib = calibration_base(model, tokens)
    groups = model.layers.groups(False)
    everything_mxfp8 = {layer.name: "mxfp8" for layers in groups.values() for layer in layers}
    reference = calib.compare(apply_formats(model.module, everything_mxfp8)).kl
    print(f"all MXFP8: calibration KL {reference:.4f}", flush=True)
    values = {}
    for index, (group, layers) in enumerate(groups.items()):
        formats = dict(everything_mxfp8) | {layer.name: "mxfp4" for layer in layers}
        increase = calib.compare(apply_formats(model.module, formats)).kl - reference
        for layer in layers:  # the solver sums its layers' scores per group
            values[layer.name] = {"mxfp4": increase / len(layers), "mxfp8": 0.0}
        print(f"{index:3d} {group}: {increase:.5f}", flush=True)
    plan_kls(model, heldout, values, "measured")


if __name__ == "__main__":
    main()
