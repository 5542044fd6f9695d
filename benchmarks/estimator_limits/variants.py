"""Plans from other forms of the fisher estimate: the loss gradient at the logits (default) or
the gradient with next tokens sampled from the model ("probe": its covariance is the KL Hessian
diag(p) - ppᵀ; the fisher-kl scorer); the diagonal form or the per-token form ½ Σ_t (G_t · ΔY_t)².

    .venv/bin/python benchmarks/estimator_limits/variants.py --grad probe --form diag
"""

from __future__ import annotations

import argparse
import time

import torch
from common import OPTIONS, add_model_argument, plan_kls, setup

import bitplan.scoring.fisher as fisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad", choices=["loss", "probe"], default="loss")
    parser.add_argument("--form", choices=["diag", "token"], default="diag")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0, help="of the sampled tokens (probe)")
    add_model_argument(parser)
    args = parser.parse_args()
    model, tokens, heldout = setup(args.model)
    start = time.perf_counter()
    values = fisher.fisher_scores(
        model.module,
        model.layers.selected(False),
        OPTIONS,
        tokens,
        form=args.form,
        progress=False,
        dtype=getattr(torch, args.dtype),
        gradient="kl" if args.grad == "probe" else "loss",
        seed=args.seed,
    )
    print(f"scored in {time.perf_counter() - start:.0f} s")
    plan_kls(model, heldout, values, f"{args.grad} {args.form} {args.dtype} seed {args.seed}")


if __name__ == "__main__":
    main()
