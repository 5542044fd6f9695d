"""The compare report: seed-style tables (report.md) and plots, all from ``results.json``.

Every number printed here is read from the results of a run; nothing is typed in.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bitplan.comparison import ROUNDING_LABELS  # noqa: E402
from bitplan.evaluation.harness import documents_label  # noqa: E402
from bitplan.evaluation.paired import UNRESOLVED, paired_difference  # noqa: E402
from bitplan.model.layers import LayerTable  # noqa: E402
from bitplan.plans import BUDGETED_RECIPES, Plan  # noqa: E402
from bitplan.plots import plot_bits_per_layer  # noqa: E402

#: How the report says each rounding (compare --rounding).
_ROUNDING_NOTE = {
    "rtn": "round-to-nearest (rows without a rounding named)",
    "gptq": "GPTQ, block by block on the calibration tokens (rows '+ GPTQ'; our plans scored "
    "for it)",
    "tuned": "GPTQ then block tuning on the calibration tokens (rows '+ tuned'; our plans scored "
    "for GPTQ, tuning's starting point)",
}


def _rounding(variant: dict) -> str:
    return variant.get("rounding", "rtn")


def _avg(variant: dict) -> float | None:
    tasks = variant.get("tasks")
    return None if not tasks else tasks["average_acc"]


def _avg_stderr(variant: dict) -> float | None:
    """Standard error of the average accuracy, the tasks taken as independent."""
    tasks = variant.get("tasks")
    if not tasks:
        return None
    errs = [t["acc_stderr"] for t in tasks["tasks"].values()]
    if any(e is None for e in errs):
        return None
    return math.sqrt(sum(e * e for e in errs)) / len(errs)


def _bits(variant: dict) -> float | None:
    plan = variant.get("plan")
    return None if plan is None else plan["avg_bits"]


def _acc_cell(variant: dict, bf16: dict) -> str:
    acc, base = _avg(variant), _avg(bf16)
    if acc is None:
        return "-"
    return f"{acc:.4f} ({100 * acc / base:.1f}%)" if base else f"{acc:.4f}"


def _task_names(results: dict) -> list[str]:
    bf16 = results["variants"]["bf16"]
    return list(bf16["tasks"]["tasks"]) if bf16.get("tasks") else []


def _row(variant: dict, bf16: dict, tasks: list[str], bold: bool = False) -> str:
    label = f"**{variant['label']}**" if bold else variant["label"]
    bits = _bits(variant)
    cells = [
        label,
        "16" if bits is None else f"{bits:.3f}",
        _acc_cell(variant, bf16),
        f"{variant['divergence']['kl']:.4f}",
        f"{variant['divergence']['ppl']:.2f}",
    ]
    for task in tasks:
        cells.append(
            f"{variant['tasks']['tasks'][task]['acc']:.4f}" if variant.get("tasks") else "-"
        )
    return "| " + " | ".join(cells) + " |"


def _header(tasks: list[str]) -> str:
    cols = ["Recipe", "Avg bits", "Avg accuracy (% of BF16)", "KL", "PPL", *tasks]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def _verdicts(results: dict) -> list[str]:
    """For each of our plans, against head, tail, uniform and BF16 rounded the same way (and,
    rounded otherwise than to nearest, against our plan rounded to nearest): the paired
    differences of the five-task average accuracy and of the correct answers' log-likelihood,
    where the results hold each document's scores; otherwise (results of older runs) accuracy
    against both standard errors, or KL, for head and tail only."""
    lines = []
    variants = results["variants"]
    for v in variants.values():
        if v["recipe"] != "bitplan":
            continue
        others = [
            o
            for o in variants.values()
            if o["options"] == v["options"]
            and _rounding(o) == _rounding(v)
            and (
                o["recipe"] == "uniform"
                or (o["recipe"] in BUDGETED_RECIPES and o["budget"] == v["budget"])
            )
        ]
        others.append(variants["bf16"])
        nearest = [  # what the rounding buys: our plan for RTN, rounded to nearest
            o
            for o in variants.values()
            if o["recipe"] == "bitplan"
            and o["options"] == v["options"]
            and o["budget"] == v["budget"]
            and _rounding(o) == "rtn" != _rounding(v)
        ]
        others += nearest
        for other in others:
            rounded = "" if _rounding(v) == "rtn" else f", {ROUNDING_LABELS[_rounding(v)]}"
            where = f"{v['options']} at {v['budget']:g} bits{rounded} vs {other['label']}"
            paired = _paired_verdict(v, other)
            if paired is not None:
                lines.append(f"- {where}: {paired}")
            elif other["recipe"] in BUDGETED_RECIPES or other in nearest:
                lines.append(f"- {where}: {_unpaired_verdict(v, other)}")
    return lines


def _documents(variant: dict, measure: int) -> dict[str, dict[str, float]] | None:
    """A variant's per-document scores (0: acc, 1: correct answer's log-likelihood), if kept."""
    documents = (variant.get("tasks") or {}).get("documents")
    if not documents:
        return None
    return {
        task: {k: scores[measure] for k, scores in docs.items()} for task, docs in documents.items()
    }


def _paired_verdict(ours: dict, other: dict) -> str | None:
    """Paired accuracy and log-likelihood differences of ``ours`` minus ``other``, in words."""
    a_acc, b_acc = _documents(ours, 0), _documents(other, 0)
    if a_acc is None or b_acc is None:
        return None
    acc = paired_difference(a_acc, b_acc)
    loglik = paired_difference(_documents(ours, 1), _documents(other, 1))
    kl_ours, kl_other = ours["divergence"]["kl"], other["divergence"]["kl"]
    kl = "" if other["recipe"] == "bf16" else f"; KL {kl_ours:.4f} vs {kl_other:.4f}"
    return (
        f"accuracy {acc.describe()} (paired, 95 %, {acc.documents} documents): "
        f"**{_said(acc.verdict)}**; correct answer's log-likelihood {loglik.describe(3)} nats: "
        f"{_said(loglik.verdict)}{kl}"
    )


def _said(verdict: str) -> str:
    return "not resolved with these documents" if verdict == UNRESOLVED else verdict


def _unpaired_verdict(ours: dict, other: dict) -> str:
    """Our plan against ``other`` from averages alone (results without per-document scores)."""
    kl_ours, kl_other = ours["divergence"]["kl"], other["divergence"]["kl"]
    ours_acc = _avg(ours)
    if ours_acc is None:
        verdict = "beats" if kl_ours < kl_other else "does NOT beat"
        return f"{verdict} it on KL ({kl_ours:.4f} vs {kl_other:.4f}); no task accuracy measured"
    diff = ours_acc - _avg(other)
    err = math.hypot(_avg_stderr(ours) or 0.0, _avg_stderr(other) or 0.0)
    if diff > err:
        return f"beats it on accuracy ({diff:+.4f}, stderr {err:.4f})"
    if diff < -err:
        return f"does NOT beat it: accuracy {diff:+.4f} (stderr {err:.4f})"
    if kl_ours < kl_other:
        return (
            f"accuracy within stderr ({diff:+.4f} ± {err:.4f}); beats it on KL "
            f"({kl_ours:.4f} vs {kl_other:.4f})"
        )
    return (
        f"does NOT beat it: accuracy within stderr ({diff:+.4f} ± {err:.4f}) "
        f"and KL {kl_ours:.4f} vs {kl_other:.4f}"
    )


def write_report(results: dict, out: Path, table: LayerTable, command: str = "") -> Path:
    """Write report.md, accuracy_vs_bits.png and bits_per_layer_*.png into ``out``."""
    variants = results["variants"]
    bf16 = variants["bf16"]
    tasks = _task_names(results)
    config = results["config"]
    documents = documents_label(config["limit"], config.get("docs"))
    lines = [
        "# bitplan compare report",
        "",
        f"- Model: `{results['model']}` ({results['model_source']})"
        + (f"; {results['model_note']}" if results["model_note"] else ""),
    ]
    if command:
        lines.append(f"- Command: `{command}`")
    scale = "counted" if config["include_scales"] else "ignored (as the reference's tables)"
    lines += [
        f"- Scorer: {config['scorer']}; calibration {config['n_samples']} x {config['seq_len']} "
        f"tokens ({config['calib'] or 'shipped default'}); scale/zero-point bits {scale}",
        "- Rounding: " + "; ".join(_ROUNDING_NOTE[r] for r in config["roundings"]),
        f"- Tasks: {', '.join(tasks) or 'none'} (lm-eval, offline data; {documents}); "
        "average = mean of `acc`",
        f"- KL: mean per-token KL(BF16 || variant) on {bf16['divergence']['tokens']} held-out "
        "tokens; PPL on the same tokens",
        f"- Time: {results['seconds'].get('total', 0):.0f} s for this run",
        "",
    ]
    for n, setting in enumerate(config["settings"], start=1):
        options = setting["options"]
        # One rounding after another, in the order of config["roundings"].
        members = [
            v
            for rounding in config["roundings"]
            for v in variants.values()
            if v["options"] == options and _rounding(v) == rounding
        ]
        lines += [f"## Table {n}: {options} mixed", "", _header(tasks), _row(bf16, bf16, tasks)]
        lines += [_row(v, bf16, tasks) for v in members if v["recipe"] in ("uniform", "bitplan")]
        lines.append("")
        for budget in setting["budgets"]:
            here = [v for v in members if v["budget"] == budget]
            if not any(v["recipe"] in ("tail", "head") for v in here):
                continue
            # Per rounding (``here`` is in their order): the baselines, then ours.
            rows = sorted(
                here,
                key=lambda v: (config["roundings"].index(_rounding(v)), v["recipe"] == "bitplan"),
            )
            best = max(rows, key=lambda v: (_avg(v) or 0.0, -v["divergence"]["kl"]))
            lines += [f"### {options} at an average of {budget:g} bits", "", _header(tasks)]
            lines += [_row(v, bf16, tasks, bold=v is best) for v in rows]
            lines.append("")
    lines += [
        "## Does our plan beat the others? (ours minus theirs)",
        "",
        *(_verdicts(results) or ["- no head/tail baselines"]),
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    _plot_accuracy_vs_bits(results, out / "accuracy_vs_bits.png")
    for setting in config["settings"]:
        for rounding in config["roundings"]:
            plans = [
                Plan.from_dict(v["plan"])
                for v in variants.values()
                if v["recipe"] == "bitplan"
                and v["options"] == setting["options"]
                and _rounding(v) == rounding
            ]
            if plans:  # each rounding's own plans (scored for it), RTN's under the old name
                name = setting["options"].replace(",", "+")
                name += "" if rounding == "rtn" else f"_{rounding}"
                plot_bits_per_layer(plans, table, out / f"bits_per_layer_{name}.png")
    return report


def _plot_accuracy_vs_bits(results: dict, path: str | os.PathLike) -> None:
    variants = results["variants"]
    settings = results["config"]["settings"]
    has_acc = _avg(variants["bf16"]) is not None
    rows = 2 if has_acc else 1
    fig, axes = plt.subplots(
        rows, len(settings), figsize=(5.5 * len(settings), 3.6 * rows), squeeze=False
    )
    # marker, line; rows of another rounding than RTN are dotted
    styles = {"bitplan": ("o", "-"), "head": ("s", "--"), "tail": ("^", "--"), "uniform": ("x", "")}
    for col, setting in enumerate(settings):
        members = [v for v in variants.values() if v["options"] == setting["options"]]
        for (recipe, (marker, line)), rounding in itertools.product(
            styles.items(), results["config"]["roundings"]
        ):
            points = sorted(
                (
                    (_bits(v), v)
                    for v in members
                    if v["recipe"] == recipe and _rounding(v) == rounding
                ),
                key=lambda point: point[0],
            )
            if not points:
                continue
            xs = [x for x, _ in points]
            label = "bitplan (ours)" if recipe == "bitplan" else recipe
            if rounding != "rtn":
                label += f" + {rounding}"
                line = ":" if line else ""
            style = dict(marker=marker, linestyle=line or "none", label=label)
            axes[-1][col].plot(xs, [v["divergence"]["kl"] for _, v in points], **style)
            if has_acc:
                axes[0][col].plot(xs, [_avg(v) for _, v in points], **style)
        if has_acc:
            axes[0][col].axhline(_avg(variants["bf16"]), color="gray", lw=1, label="BF16")
            axes[0][col].set_ylabel("average accuracy")
            axes[0][col].set_title(setting["options"])
            axes[0][col].legend(fontsize=7)
        axes[-1][col].set_ylabel("KL(BF16 || variant)")
        axes[-1][col].set_xlabel("average bits per weight")
        axes[-1][col].set_yscale("log")
        if not has_acc:
            axes[-1][col].set_title(setting["options"])
        axes[-1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
