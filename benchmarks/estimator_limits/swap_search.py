"""Local search by measured KL around the solver's 4.5-bit MXFP plan: each round tries swapping
one MXFP8 group for one MXFP4 group of the same kind (so the bits stay equal), 3 x 3 candidates
per kind taken from the fisher ranking, and keeps the swap of lowest calibration KL.

    .venv/bin/python benchmarks/estimator_limits/swap_search.py [--rounds 2]
"""

from __future__ import annotations

import argparse

from common import OPTIONS, add_model_argument, calibration_base, setup

from bitplan.plans import solve_plans
from bitplan.quantization import apply_formats
from bitplan.scoring import score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    add_model_argument(parser)
    args = parser.parse_args()
    model, tokens, heldout = setup(args.model)
    calib = calibration_base(model, tokens)
    scores = score(model, OPTIONS, tokens)
    (plan,) = solve_plans(
        model.layers, OPTIONS, scores, [4.5], model.identity, include_scales=False
    )
    groups = model.layers.groups(False)
    gain = {
        group: sum(
            scores.layer_scores[lay.name]["mxfp4"] - scores.layer_scores[lay.name]["mxfp8"]
            for lay in layers
        )
        for group, layers in groups.items()
    }
    formats = dict(plan.layer_formats)

    def kind(group: str) -> str:
        return group.rsplit(".", 1)[1]

    def swapped(demote: str, promote: str) -> dict[str, str]:
        new = dict(formats)
        new.update({layer.name: "mxfp4" for layer in groups[demote]})
        new.update({layer.name: "mxfp8" for layer in groups[promote]})
        return new

    current = calib.compare(apply_formats(model.module, formats)).kl
    held = heldout.compare(apply_formats(model.module, formats)).kl
    print(f"solver's plan: calibration KL {current:.4f}, held-out KL {held:.4f}", flush=True)
    for round_ in range(args.rounds):
        tried = []
        for k in sorted({kind(g) for g in groups}):
            same = [g for g in groups if kind(g) == k]
            high = sorted((g for g in same if formats[groups[g][0].name] == "mxfp8"), key=gain.get)
            low = sorted((g for g in same if formats[groups[g][0].name] == "mxfp4"), key=gain.get)
            for demote in high[:3]:
                for promote in low[::-1][:3]:
                    new = swapped(demote, promote)
                    tried.append((calib.compare(apply_formats(model.module, new)).kl, new))
        best_kl, best = min(tried, key=lambda t: t[0])
        print(f"round {round_}: {len(tried)} swaps, best calibration KL {best_kl:.4f}", flush=True)
        if best_kl >= current:
            break
        current, formats = best_kl, best
        held = heldout.compare(apply_formats(model.module, formats)).kl
        print(f"  held-out KL {held:.4f}", flush=True)


if __name__ == "__main__":
    main()
