"""What the estimator experiments share: the model (``--model``: the embedded default or
``gemma3-270m``), its calibration and held-out tokens, and the held-out KL of the plans that a set
of scores gives (MXFP4 + MXFP8 at 4.5, 5 and 6 bits, scale bits ignored, the solver of
`bitplan search`)."""

from __future__ import annotations

import argparse

from bitplan.data.calibration import calibration_samples
from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.formats import parse_format_list
from bitplan.model import load_model
from bitplan.plans import solve_plans
from bitplan.quantization import apply_plan
from bitplan.scoring.scores import Scores

OPTIONS = parse_format_list("mxfp4,mxfp8")
BUDGETS = (4.5, 5.0, 6.0)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="model (default: the embedded default; or gemma3-270m)"
    )


def setup(source: str | None = None):
    """The model, its 16 x 256 calibration tokens and the held-out base logits."""
    model = load_model(source)
    tokens = calibration_samples(model.tokenizer, 16, 256)
    heldout = BaseLogits.compute(model.module, heldout_samples(model.tokenizer, 8, 512))
    return model, tokens, heldout


def calibration_base(model, tokens) -> BaseLogits:
    """Base logits on the first 8 calibration sequences: what the measured experiments compare
    quantized models against (the held-out text stays for judging the plans)."""
    return BaseLogits.compute(model.module, tokens[:8])


def plan_kls(model, heldout, values: dict[str, dict[str, float]], label: str) -> None:
    """Solve for every budget with these layer scores and print each plan's held-out KL."""
    scores = Scores("experiment", [f.name for f in OPTIONS], values, model.identity, "", 0, 0.0, {})
    plans = solve_plans(
        model.layers, OPTIONS, scores, BUDGETS, model.identity, include_scales=False
    )
    for plan in plans:
        kl = heldout.compare(apply_plan(model.module, plan)).kl
        print(f"{label}: budget {plan.budget_avg_bits:g} held-out KL {kl:.4f}", flush=True)
