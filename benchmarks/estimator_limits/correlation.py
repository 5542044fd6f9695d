"""Each estimator against measurement, one fusion group at a time: the calibration KL increase when
only that group takes the low option (every other group the high one), against what each scorer
predicts for the same change; Spearman, Pearson and the ratio of totals, over all groups, per role
(q/k/v, o, gate/up, down) and per depth (thirds of the blocks). Also: how much of the low
option's damage is weight error and how much activation error (whole model, one at a time), and
which groups each scorer's plans leave low, with the measured cost of that choice (the sum of
those groups' measured increases).

Measurements are saved in --out as they are made, so a killed run resumes.

    .venv/bin/python benchmarks/estimator_limits/correlation.py --model gemma3-270m \
        --options mxfp4,mxfp8 --out /tmp/corr-gemma-mx.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import add_model_argument
from scipy import stats
from torch import nn

import bitplan.scoring.fisher as fisher
from bitplan.data.calibration import calibration_samples
from bitplan.formats import parse_format_list
from bitplan.model import load_model
from bitplan.model.layers import find_blocks
from bitplan.model.logits import logits_from_hidden
from bitplan.plans import PlanSpace
from bitplan.quantization import FakeQuantLinear, apply_formats
from bitplan.scoring import SCORERS, score
from bitplan.scoring.replay import final_norm, record_block_inputs, run_block
from bitplan.scoring.scores import Scores

ROLES = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up"}


class _WeightOnly(FakeQuantLinear):
    """The low option's weight with an unquantized input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


class CalibrationKL:
    """Mean KL(base || variant) over every position of the first 8 calibration sequences, for
    variants equal to a fixed reference model before some block: the reference's block inputs
    are recorded once and a variant runs only from its first changed block on. The base model's
    probabilities p and Σ p log p are kept (2 GB for Gemma-3's vocabulary), so a variant's KL is
    Σ p log p − Σ p·logits + Σ p · logsumexp(logits); the head runs on 512 tokens at a time (the
    default chunks of bitplan's evaluator would read Gemma-3's 670 MB head 8x as often)."""

    CHUNK = 512

    def __init__(self, base: nn.Module, reference: nn.Module, tokens: torch.Tensor):
        self.batches = list(tokens[:8].split(4))
        self.probs, self.sums, self.neg_entropy = [], [], 0.0
        with torch.inference_mode():
            for batch in self.batches:
                for logits in self._logits(base, record_block_inputs(base, batch)):
                    log_p = logits.log_softmax(-1)
                    self.probs.append(log_p.exp())
                    self.sums.append(self.probs[-1].sum(-1, dtype=torch.float64))  # 1 ± rounding
                    self.neg_entropy += float((self.probs[-1] * log_p).sum(dtype=torch.float64))
            self.records = [record_block_inputs(reference, b) for b in self.batches]

    def _logits(self, model: nn.Module, record, start: int | None = None):
        _, blocks = find_blocks(model)
        if start is None:
            hidden = record.final_hidden
        else:
            hidden = record.hidden[start]
            for index in range(start, len(blocks)):
                hidden = run_block(blocks[index], hidden, record.kwargs[index])
        hidden = final_norm(model)(hidden).reshape(-1, hidden.shape[-1])
        for part in hidden.split(self.CHUNK):
            yield logits_from_hidden(model, part).float()

    @torch.inference_mode()
    def kl(self, variant: nn.Module, start: int = 0) -> float:
        cross, count, chunks = 0.0, 0, zip(self.probs, self.sums, strict=True)
        for record in self.records:
            for logits in self._logits(variant, record, start):
                p, total = next(chunks)
                cross += float((p * logits).sum(dtype=torch.float64))
                cross -= float((torch.logsumexp(logits, -1).double() * total).sum())
                count += logits.shape[0]
        return (self.neg_entropy - cross) / count


def measure(model, tokens, low, high, saved: dict, out: Path) -> dict[str, float]:
    """Calibration KL increase per fusion group (low in that group only), saved as it goes."""
    groups = model.layers.groups(False)
    layer_names = [layer.name for layers in groups.values() for layer in layers]
    quantized = apply_formats(model.module, dict.fromkeys(layer_names, high))
    calib = CalibrationKL(model.module, quantized, tokens)
    originals = dict(model.module.named_modules())
    measured = saved.setdefault("measured", {})
    if "all_high" not in saved:
        saved["all_high"] = calib.kl(quantized)
    if low.quantizes_activations and "uniform" not in saved:
        # Whole model in the low option: weights only, activations only, both.
        parts = {}
        for kind in ("weights", "activations", "both"):
            variant = apply_formats(model.module, {})
            for name in layer_names:
                layer = FakeQuantLinear.from_linear(originals[name], low)
                if kind == "weights":
                    layer.__class__ = _WeightOnly
                elif kind == "activations":
                    layer.weight = originals[name].weight
                _set(variant, name, layer)
            parts[kind] = calib.kl(variant)
            del variant
        saved["uniform"] = parts
    reference = saved["all_high"]
    for index, (group, layers) in enumerate(groups.items()):
        if group in measured:
            continue
        high_modules = {layer.name: quantized.get_submodule(layer.name) for layer in layers}
        for layer in layers:
            _set(quantized, layer.name, FakeQuantLinear.from_linear(originals[layer.name], low))
        measured[group] = calib.kl(quantized, layers[0].block) - reference
        for name, module in high_modules.items():
            _set(quantized, name, module)
        out.write_text(json.dumps(saved, indent=1))
        print(f"{index:3d} {group}: {measured[group]:.5f}", flush=True)
    return measured


def _stats(measured: list[float], predicted: list[float]) -> str:
    if len(measured) < 3:
        return "n/a"
    rho = stats.spearmanr(measured, predicted).statistic
    r = stats.pearsonr(measured, predicted).statistic
    ratio = sum(predicted) / sum(measured) if sum(measured) else float("nan")
    return f"{rho:.2f} / {r:.2f} / {ratio:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_argument(parser)
    parser.add_argument("--options", default="mxfp4,mxfp8", help="low,high")
    parser.add_argument(
        "--scorers",
        default=",".join(SCORERS),
        help="scorers, or other forms of the fisher estimate: fisher-token, fisher-split",
    )
    parser.add_argument("--budgets", default="4.5,5,6", help="plans whose choices are shown")
    parser.add_argument("--out", type=Path, required=True, help="JSON of measurements (resumes)")
    args = parser.parse_args()
    low, high = parse_format_list(args.options)
    model = load_model(args.model)
    tokens = calibration_samples(model.tokenizer, 16, 256)
    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    measured = measure(model, tokens, low, high, saved, args.out)
    groups = model.layers.groups(False)
    blocks = 1 + max(layers[0].block for layers in groups.values())
    print(f"\n{model.identity}: {args.options}, all-{high.name} KL {saved['all_high']:.4f}")
    if "uniform" in saved:
        print(
            "all-{0}: weights only {weights:.4f}, activations only {activations:.4f}, both "
            "{both:.4f}".format(low.name, **saved["uniform"])
        )
    predictions = {}
    for scorer in args.scorers.split(","):
        if scorer in SCORERS:
            values = score(model, [low, high], tokens, scorer=scorer, progress=False).layer_scores
        else:  # fisher-token, fisher-split: another form of the fisher estimate
            form = scorer.removeprefix("fisher-")
            layers = model.layers.selected(False)
            values = fisher.fisher_scores(model.module, layers, [low, high], tokens, form=form)
        predictions[scorer] = {
            group: sum(
                values[layer.name][low.name] - values[layer.name][high.name] for layer in layers
            )
            for group, layers in groups.items()
        }
    subsets = {"all": list(groups)}
    for role in ("qkv", "o", "gate_up", "down"):
        subsets[role] = [g for g, ls in groups.items() if ROLES.get(ls[0].role, ls[0].role) == role]
    for third, name in enumerate(("first third", "middle third", "last third")):
        subsets[name] = [
            g
            for g, ls in groups.items()
            if third * blocks <= 3 * ls[0].block < (third + 1) * blocks
        ]
    print("\nSpearman / Pearson / predicted total ÷ measured total")
    print("| groups | n | " + " | ".join(predictions) + " |")
    print("|---|---:|" + "---|" * len(predictions))
    for subset, members in subsets.items():
        cells = [
            _stats([measured[g] for g in members], [pred[g] for g in members])
            for pred in predictions.values()
        ]
        print(f"| {subset} | {len(members)} | " + " | ".join(cells) + " |")
    print("\nPer block: measured increase (sum of its groups), and predicted ÷ measured")
    print("| block | measured | " + " | ".join(predictions) + " |")
    print("|---:|---:|" + "---:|" * len(predictions))
    for block in range(blocks):
        members = [g for g, ls in groups.items() if ls[0].block == block]
        total = sum(measured[g] for g in members)
        ratios = [f"{sum(pred[g] for g in members) / total:.1f}" for pred in predictions.values()]
        print(f"| {block} | {total:.4f} | " + " | ".join(ratios) + " |")
    space = PlanSpace.build(model.layers, [low, high], include_scales=False)
    budgets = [float(b) for b in args.budgets.split(",")]
    print("\nGroups left low by each plan; measured cost = sum of their measured increases")
    for scorer, pred in (predictions | {"measured": measured}).items():
        values = {
            layer.name: {low.name: pred[g] / len(ls), high.name: 0.0}
            for g, ls in groups.items()
            for layer in ls
        }
        scores = Scores(scorer, [low.name, high.name], values, model.identity, "", 0, 0.0, {})
        for plan in space.solve(scores, budgets, model.identity):
            left = [g for g, ls in groups.items() if plan.layer_formats[ls[0].name] == low.name]
            by_role = {}
            for g in left:
                role = ROLES.get(groups[g][0].role, groups[g][0].role)
                by_role[role] = by_role.get(role, 0) + 1
            cost = sum(measured[g] for g in left)
            print(
                f"{scorer:<10} {plan.budget_avg_bits:g} bits: {len(left)} low {by_role}, "
                f"measured cost {cost:.4f}"
            )


if __name__ == "__main__":
    main()
