"""What the fisher-kl scorer costs against the default fisher scorer: wall time of one scoring
pass (cache off) on the same calibration tokens, each scorer twice in alternating order, the best
of the two kept. Run alone: the times are of this machine with nothing else running.

    .venv/bin/python benchmarks/estimator_limits/scoring_cost.py [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import time

from common import add_model_argument

from bitplan.data.calibration import calibration_samples
from bitplan.formats import parse_format_list
from bitplan.model import load_model
from bitplan.scoring import score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--options", default="mxfp4,mxfp8")
    parser.add_argument("--scorers", default="fisher,fisher-kl")
    args = parser.parse_args()
    model = load_model(args.model)
    tokens = calibration_samples(model.tokenizer, 16, 256)
    options = parse_format_list(args.options)
    scorers = args.scorers.split(",")
    best = dict.fromkeys(scorers, float("inf"))
    for round_ in range(2):
        for scorer in scorers if round_ == 0 else scorers[::-1]:
            start = time.perf_counter()
            score(model, options, tokens, scorer=scorer, cache=False, progress=False)
            seconds = time.perf_counter() - start
            best[scorer] = min(best[scorer], seconds)
            print(f"{model.name} {args.options} {scorer}: {seconds:.1f} s", flush=True)
    first = scorers[0]
    for scorer in scorers:
        print(f"best {scorer}: {best[scorer]:.1f} s ({best[scorer] / best[first]:.2f}x {first})")


if __name__ == "__main__":
    main()
