"""Tuned rounding end to end (issue 17): bitplan's plans rounded to nearest, the same plans
GPTQ-rounded, GPTQ-aware plans (``search --rounding gptq``) GPTQ-rounded, and both plans with
GPTQ and block tuning (``--rounding tuned``), each through the command line
exactly as a user runs it (``bitplan search``, then ``bitplan quantize --format fake``),
reloaded from the export and measured by KL(base || quantized) on held-out text.

For MXFP4+MXFP8 at 4.5, 5 and 6 bits and W2G128+W4G128 at 3 bits (scale bits ignored, as the
reference's tables), plus uniform W4G128 as a sanity row. Calibration 16 x 256 tokens of the
shipped text (the CLI's defaults), held-out 8 x 512 tokens of other prose. Each search and each
quantize is its own process, timed (wall) with its peak RSS (``wait4``). Resumable: every number
is written to ``--out``/results.json as it comes, and a re-run skips what is there.

    .venv/bin/python benchmarks/tuned_rounding.py [--model gemma3-270m] [--out out/tuned] [--report]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.jsonio import write_json_atomic
from bitplan.model import load_model

SETS = {
    "mx": ("mxfp4,mxfp8", (4.5, 5.0, 6.0)),
    "int": ("w2g128,w4g128", (3.0,)),
    "int_fr": ("w2g128_fr,w4g128_fr", (3.0,)),  # the symmetric full-range grid
}
#: Uniform sanity rows: set name -> the format every layer gets.
UNIFORM_SETS = {"uniform": "w4g128", "uniform_fr": "w4g128_fr"}
#: Table columns: (label, which search's plan, rounding at quantize).
VARIANTS = (
    ("plan + RTN", "rtn", "rtn"),
    ("plan + GPTQ", "rtn", "gptq"),
    ("GPTQ-aware plan + GPTQ", "gptq", "gptq"),
    ("plan + tuned", "rtn", "tuned"),
    ("GPTQ-aware plan + tuned", "gptq", "tuned"),
)
BITPLAN = [sys.executable, "-m", "bitplan.cli"]


def run_child(argv: list[str], log: Path) -> dict:
    """Run ``bitplan argv`` alone; its wall time and peak RSS (MB). Output goes to ``log``.

    The peak RSS comes from GNU time, which starts bitplan itself: a child started directly by
    this (large) process would inherit its RSS as a starting high-water mark (Linux carries
    ``ru_maxrss`` across fork and exec)."""
    rss_file = log.with_suffix(".rss")
    start = time.perf_counter()
    with open(log, "w") as out:
        command = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *BITPLAN, *argv]
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"bitplan {' '.join(argv)} failed; see {log}")
    peak_kb = int(rss_file.read_text().split()[-1])
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024)}


def budget_name(bits: float) -> str:
    return f"{bits:g}".replace(".", "p")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundled model key or folder")
    parser.add_argument("--out", default="out/tuned", help="results, logs and scratch exports")
    parser.add_argument("--sets", default="int,mx,uniform", help=", ".join([*SETS, *UNIFORM_SETS]))
    parser.add_argument("--report", action="store_true", help="print the tables of --out only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.report:
        print(report(results))
        return

    def record(key: str, value: dict) -> None:
        results[key] = value
        write_json_atomic(results_path, results)
        print(key, value, flush=True)

    model_arg = [args.model] if args.model else []
    model = load_model(args.model)
    base = BaseLogits.compute(model.module, heldout_samples(model.tokenizer, 8, 512))
    print(f"{model.identity} ({model.note}); base ppl {base.base_ppl:.2f}", flush=True)
    del model

    def quantize_and_measure(key: str, plan: Path, rounding: str) -> None:
        if key in results:
            return
        export = out / "export"
        shutil.rmtree(export, ignore_errors=True)
        cost = run_child(
            [
                "quantize",
                *model_arg,
                "--plan",
                str(plan),
                "--format",
                "fake",
                "--out",
                str(export),
                "--rounding",
                rounding,
            ],  # fmt: skip
            out / f"{key.replace(' ', '_')}.log",
        )
        divergence = base.compare(load_model(export).module)
        shutil.rmtree(export)
        record(key, {"kl": divergence.kl, "ppl": divergence.ppl, "quantize": cost})

    for set_name in args.sets.split(","):
        if set_name in UNIFORM_SETS:
            fmt = UNIFORM_SETS[set_name]
            plans = out / f"{set_name}-plans"
            if f"{set_name} search" not in results:
                cost = run_child(
                    [
                        "search",
                        *model_arg,
                        "--options",
                        f"{fmt},w8g128",
                        "--recipe",
                        "uniform",
                        "--ignore-scale-bits",
                        "--out",
                        str(plans),
                    ],  # fmt: skip
                    out / f"{set_name}-search.log",
                )
                record(f"{set_name} search", cost)
            for rounding in ("rtn", "gptq", "tuned"):
                quantize_and_measure(
                    f"uniform {fmt} {rounding}", next(plans.glob("plan_uniform*.json")), rounding
                )
            continue
        options, budgets = SETS[set_name]
        for rounding in ("rtn", "gptq"):
            key = f"{set_name} search {rounding}"
            if key not in results:
                cost = run_child(
                    [
                        "search",
                        *model_arg,
                        "--options",
                        options,
                        "--avg-bits",
                        *map(str, budgets),
                        "--ignore-scale-bits",
                        "--no-cache",
                        "--rounding",
                        rounding,
                        "--out",
                        str(out / f"{set_name}-{rounding}-plans"),
                    ],  # fmt: skip
                    out / f"{set_name}-search-{rounding}.log",
                )
                record(key, cost)
        for bits in budgets:
            for label, searched, rounding in VARIANTS:
                plan = (
                    out / f"{set_name}-{searched}-plans" / f"plan_bitplan_{budget_name(bits)}.json"
                )
                quantize_and_measure(f"{set_name} {bits:g} {label}", plan, rounding)
    print(report(results))


def report(results: dict) -> str:
    """The markdown tables of what ``results`` holds: KL per variant, then the costs."""
    lines = [
        "| options @ bits | " + " | ".join(label for label, _, _ in VARIANTS) + " | best ÷ RTN |",
        "|---|" + "---:|" * (len(VARIANTS) + 1),
    ]
    for set_name, (options, budgets) in SETS.items():
        for bits in budgets:
            kls = [
                results.get(f"{set_name} {bits:g} {label}", {}).get("kl") for label, *_ in VARIANTS
            ]
            if kls[0] is not None:
                lines.append(f"| {options} @ {bits:g} | " + _kl_cells(kls) + " |")
    for fmt in UNIFORM_SETS.values():
        if f"uniform {fmt} rtn" in results:  # one plan: the columns of RTN-scored plans
            kls = [
                results.get(f"uniform {fmt} {rounding}", {}).get("kl")
                if searched == "rtn"
                else None
                for _, searched, rounding in VARIANTS
            ]
            lines.append(f"| uniform {fmt} | " + _kl_cells(kls) + " |")
    lines += ["", "| step | wall s | peak RSS MB |", "|---|---:|---:|"]
    for key, value in results.items():
        cost = value.get("quantize", value)
        if "seconds" in cost:
            step = key if "quantize" not in value else f"quantize: {key}"
            lines.append(f"| {step} | {cost['seconds']:.0f} | {cost['peak_rss_mb']} |")
    return "\n".join(lines)


def _kl_cells(kls: list[float | None]) -> str:
    """The table cells of a row's KLs (``-`` where not measured) and best ÷ the first (RTN)."""
    cells = ["-" if kl is None else f"{kl:.4f}" for kl in kls]
    best = min(kl for kl in kls if kl is not None)
    return " | ".join([*cells, f"{best / kls[0]:.2f}"])


if __name__ == "__main__":
    main()
