"""Plan quality on a bundled model (the embedded default or --model gemma3-270m): KL divergence of the fake-quantized model per recipe.

For MXFP4+MXFP8 at 4.5, 5 and 6 bits and W2G128+W4G128 at 3 bits, on both integer grids
(scale bits ignored, as the reference's tables), measures KL(base || quantized) on held-out text for: our plans (the fisher
and fisher-kl scorers), the delta-loss plan (the reference's estimator, same solver), uniform, head and tail.

    .venv/bin/python benchmarks/plan_quality.py [--model gemma3-270m] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from bitplan.data.calibration import calibration_samples
from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.formats import parse_format_list
from bitplan.model import load_model
from bitplan.plans import BUDGETED_RECIPES, PlanSpace, recipe_plan
from bitplan.quantization import apply_plan
from bitplan.scoring import SCORERS, score

SETTINGS = {
    "mxfp4,mxfp8": [4.5, 5.0, 6.0],
    "w2g128,w4g128": [3.0],
    "w2g128_fr,w4g128_fr": [3.0],  # auto-round's full-range grid, what W2A16 means there
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: the embedded default; or gemma3-270m)")
    parser.add_argument("--n-samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration sequence length")
    parser.add_argument("--heldout-samples", type=int, default=8)
    parser.add_argument("--heldout-len", type=int, default=512)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument(
        "--scorers", default=",".join(SCORERS), help="which scorers' plans to measure"
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS.keys()).replace(",w2", ";w2"),
        help="option sets to run, separated by ';' (default: both)",
    )
    parser.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the head, tail and uniform recipes (--no-baselines: the scorers' only)",
    )
    args = parser.parse_args()

    model = load_model(args.model)
    tokens = calibration_samples(model.tokenizer, args.n_samples, args.seq_len)
    base = BaseLogits.compute(
        model.module, heldout_samples(model.tokenizer, args.heldout_samples, args.heldout_len)
    )
    print(f"model {model.identity} ({model.note}); base ppl {base.base_ppl:.2f}")
    print(f"calibration {tuple(tokens.shape)}; held-out {base.num_predictions} predicted tokens")
    rows = []
    wanted = {",".join(f.name for f in parse_format_list(o)) for o in args.settings.split(";")}
    settings = {o: b for o, b in SETTINGS.items() if o in wanted}
    for options, budgets in settings.items():
        formats = parse_format_list(options)
        space = PlanSpace.build(model.layers, formats, include_scales=False)
        plans = {}
        for scorer in args.scorers.split(","):
            start = time.perf_counter()
            scores = score(model, formats, tokens, scorer=scorer)
            seconds = time.perf_counter() - start
            print(
                f"{options}: {scorer} scores in {seconds:.0f} s (cached: {'cache_hit' in scores.extra})"
            )
            for plan in space.solve(scores, budgets, model.identity):
                plans[(scorer, plan.budget_avg_bits)] = plan
        if args.baselines:
            for budget in budgets:
                for recipe in BUDGETED_RECIPES:
                    plans[(recipe, budget)] = recipe_plan(space, recipe, budget, model.identity)
            uniform = recipe_plan(space, "uniform", None, model.identity)
            plans[("uniform", uniform.avg_bits)] = uniform
        for (recipe, budget), plan in plans.items():
            quantized = apply_plan(model.module, plan)
            div = base.compare(quantized)
            del quantized
            rows.append(
                {
                    "options": options,
                    "recipe": recipe,
                    "budget": budget,
                    "avg_bits": plan.avg_bits,
                    "kl": div.kl,
                    "top1": div.top1_agreement,
                    "ppl": div.ppl,
                }
            )
            print(
                f"{options:<14} {recipe:<11} budget {budget:<5g} bits {plan.avg_bits:6.3f} "
                f"KL {div.kl:.4f} top1 {div.top1_agreement:.3f} ppl {div.ppl:.2f}",
                flush=True,
            )
    present = {row["recipe"] for row in rows}
    recipes = [r for r in (*SCORERS, *BUDGETED_RECIPES) if r in present]
    print(f"\n| options | budget | {' | '.join(recipes)} | uniform |")
    print("|---|---|" + "---|" * (len(recipes) + 1))
    for options, budgets in settings.items():
        uniform_kl = next(
            (r["kl"] for r in rows if r["options"] == options and r["recipe"] == "uniform"),
            float("nan"),
        )
        for budget in budgets:
            kl = {
                r["recipe"]: r["kl"]
                for r in rows
                if r["options"] == options and r["budget"] == budget
            }
            best = min(kl, key=kl.get)
            cells = [f"**{kl[r]:.4f}**" if r == best else f"{kl[r]:.4f}" for r in recipes]
            print(f"| {options} | {budget:g} | {' | '.join(cells)} | {uniform_kl:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
