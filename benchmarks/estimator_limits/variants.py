"""Plans from other forms of the fisher estimate: the loss gradient at the logits (default) or
Rademacher probes whose covariance is the KL Hessian diag(p) - ppᵀ; the diagonal form or the
per-token form ½ Σ_t (G_t · ΔY_t)².

    .venv/bin/python benchmarks/estimator_limits/variants.py --grad probe --form diag
"""

from __future__ import annotations

import argparse
import time

import torch
from common import OPTIONS, add_model_argument, plan_kls, setup

import bitplan.score.fisher as fisher
from bitplan.score.replay import final_norm


def probe_gradient(model, final_hidden, _input_ids, generator):
    """Gradient at the last block's output of Σ_t v_t · logits_t, with v_t = √p ⊙ r − p (√p · r)
    for Rademacher r: E[v vᵀ] = diag(p) − ppᵀ, the Hessian of KL at the logits."""
    head, norm = model.get_output_embeddings(), final_norm(model)
    grads = []
    for hidden in final_hidden.split(1):
        hidden = hidden.detach().requires_grad_(True)
        logits = head(norm(hidden)).float()
        with torch.no_grad():
            prob = logits[:, :-1].softmax(-1)
            root = prob.sqrt()
            signs = torch.randint(0, 2, prob.shape, generator=generator).float() * 2 - 1
            probe = torch.zeros_like(logits)
            probe[:, :-1] = root * signs - prob * (root * signs).sum(-1, keepdim=True)
        (grad,) = torch.autograd.grad(logits, hidden, grad_outputs=probe)
        grads.append(grad)
    return torch.cat(grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad", choices=["loss", "probe"], default="loss")
    parser.add_argument("--form", choices=["diag", "token"], default="diag")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    add_model_argument(parser)
    args = parser.parse_args()
    if args.grad == "probe":
        generator = torch.Generator().manual_seed(0)
        fisher.loss_gradient = lambda m, h, ids: probe_gradient(m, h, ids, generator)
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
    )
    print(f"scored in {time.perf_counter() - start:.0f} s")
    plan_kls(model, heldout, values, f"{args.grad} {args.form} {args.dtype}")


if __name__ == "__main__":
    main()
