"""``bitplan compare``: the reference's tables, end to end, in one process.

Scores once per option set, solves every budget, builds every baseline recipe, then for each
variant in turn (one model copy at a time) fake-quantizes the model and measures it: task
accuracy through lm-eval and KL divergence from the unquantized model on held-out text.
Every finished variant is written to ``results.json`` at once, so an interrupted run resumes
where it stopped when started again with the same configuration.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bitplan.cache import cache_dir
from bitplan.compute import ComputeDtype, choose_dtype
from bitplan.data.calibration import calibration_samples
from bitplan.data.heldout import heldout_samples
from bitplan.data.offline_tasks import DEFAULT_TASKS
from bitplan.errors import BitplanError
from bitplan.evaluation.divergence import BaseLogits
from bitplan.evaluation.harness import evaluate_tasks
from bitplan.formats import parse_format_list
from bitplan.jsonio import write_json_atomic
from bitplan.model.loading import LoadedModel
from bitplan.plans import BUDGETED_RECIPES, RECIPES, Plan, PlanSpace, recipe_plan
from bitplan.quantization.sequential import quantize_model
from bitplan.scoring import DEFAULT_SCORER, score

RESULTS_VERSION = 1


@dataclass
class Setting:
    """One option set, its budgets and the baseline recipes to compare at them."""

    options: str  # "mxfp4,mxfp8"
    budgets: list[float]
    recipes: list[str]  # from RECIPES

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``OPTIONS:BUDGETS[:RECIPES]``, e.g. ``mxfp4,mxfp8:4.5,5,6:uniform,head,tail``."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise BitplanError(
                f"setting {text!r} is not OPTIONS:BUDGETS[:RECIPES], e.g. mxfp4,mxfp8:4.5,5,6:head,tail"
            )
        options = ",".join(f.name for f in parse_format_list(parts[0]))
        try:
            budgets = [float(b) for b in parts[1].split(",") if b]
        except ValueError as err:
            raise BitplanError(f"setting {text!r}: budgets must be numbers ({err})") from err
        recipes = [r for r in parts[2].split(",") if r] if len(parts) == 3 else []
        unknown = [r for r in recipes if r not in RECIPES]
        if unknown:
            raise BitplanError(f"setting {text!r}: unknown recipe {unknown[0]!r}; use {RECIPES}")
        return cls(options, budgets, recipes)


DEFAULT_SETTINGS = (
    Setting("mxfp4,mxfp8", [4.5, 5.0, 6.0], ["uniform", "head", "tail"]),
    # The reference's W2A16 and W4A16: auto-round's full-range symmetric grid.
    Setting("w2g128_fr,w4g128_fr", [3.0], ["head", "tail"]),
)


@dataclass
class CompareConfig:
    settings: list[Setting] = field(default_factory=lambda: list(DEFAULT_SETTINGS))
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    limit: int | float | None = None
    docs: int | None = None  # a document budget over all tasks instead of a limit per task
    eval_batch_size: int = 8
    include_scales: bool = False  # the reference's tables ignore scale/zero-point bits
    scorer: str = DEFAULT_SCORER
    dtype: str = "auto"  # what every pass computes in (bitplan.compute)
    n_samples: int = 16
    seq_len: int = 256
    heldout_samples: int = 8
    heldout_len: int = 512
    calib: str | None = None
    rounding: str = "rtn"  # every plan scored for, and rounded by: rtn or gptq

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Variant:
    """One model to measure: BF16, or a plan."""

    key: str  # stable id, e.g. "mxfp4,mxfp8|bitplan|5"
    label: str  # "BF16", "Ours 5-bit", "Head layers 8-bit" ...
    options: str | None
    recipe: str  # "bf16", "bitplan", "uniform", "head", "tail"
    budget: float | None
    plan: Plan | None


def _recipe_label(recipe: str, budget: float | None, high_bits: str) -> str:
    if recipe == "bitplan":
        return f"Ours {budget:g}-bit"
    if recipe == "uniform":
        return "Pure low-bit"
    if recipe == "head":
        return f"Head layers {high_bits}"
    return f"Tail layers {high_bits}"


def build_variants(
    model: LoadedModel, config: CompareConfig, calibration, progress: bool = True
) -> list[Variant]:
    """Score, solve and build baselines for every setting: the list of models to measure."""
    variants = [Variant("bf16", "BF16", None, "bf16", None, None)]
    for setting in config.settings:
        formats = parse_format_list(setting.options)
        high = max(formats, key=lambda f: f.bits_per_weight((4096, 4096), False))
        high_bits = f"{high.bits_per_weight((4096, 4096), False):g}-bit"
        scores = score(
            model,
            formats,
            calibration,
            scorer=config.scorer,
            progress=progress,
            dtype=config.dtype,
            rounding=config.rounding,
        )
        space = PlanSpace.build(model.layers, formats, include_scales=config.include_scales)
        for plan in space.solve(scores, setting.budgets, model.identity):
            key = f"{setting.options}|bitplan|{plan.budget_avg_bits:g}"
            variants.append(
                Variant(
                    key,
                    _recipe_label("bitplan", plan.budget_avg_bits, ""),
                    setting.options,
                    "bitplan",
                    plan.budget_avg_bits,
                    plan,
                )
            )
        for recipe in setting.recipes:
            budgets = setting.budgets if recipe in BUDGETED_RECIPES else [None]
            for budget in budgets:
                plan = recipe_plan(space, recipe, budget, model.identity)
                key = f"{setting.options}|{recipe}|{'-' if budget is None else f'{budget:g}'}"
                variants.append(
                    Variant(
                        key,
                        _recipe_label(recipe, budget, high_bits),
                        setting.options,
                        recipe,
                        budget,
                        plan,
                    )
                )
    return variants


def _base_logits(model: LoadedModel, config: CompareConfig, compute: ComputeDtype) -> BaseLogits:
    """The base model's held-out log-probabilities, cached on disk (they take a full pass)."""
    name = (
        f"{model.identity}-{config.heldout_samples}x{config.heldout_len}-{compute.name}.safetensors"
    )
    path = cache_dir() / "base_logits" / name.replace("/", "_")
    if path.is_file():
        return BaseLogits.load(path)
    tokens = heldout_samples(model.tokenizer, config.heldout_samples, config.heldout_len)
    base = BaseLogits.compute(model.module, tokens, compute_dtype=compute.dtype)
    base.save(path)
    return base


def run_compare(
    model: LoadedModel,
    config: CompareConfig,
    out: Path,
    progress: bool = True,
    quiet: bool = True,
) -> dict:
    """Measure every variant, resuming from ``out/results.json`` when its configuration matches
    (``quiet=False`` lets lm-eval log and draw its own bars).

    Returns the results dictionary (also in ``out/results.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = {
        "version": RESULTS_VERSION,
        "model": model.identity,
        "model_source": model.source,
        "model_note": model.note,
        "config": config.to_dict(),
        "variants": {},
        "seconds": {},
    }
    if results_path.is_file():
        previous = json.loads(results_path.read_text())
        # Results written before compare had --rounding were rounded to nearest.
        previous_config = {"rounding": "rtn", **previous.get("config", {})}
        if previous_config == results["config"] and previous.get("model") == model.identity:
            results = previous
            if progress:
                done = len(results["variants"])
                print(f"resuming: {done} variant(s) already measured in {results_path}")
        else:
            raise BitplanError(
                f"{results_path} holds results of another configuration or model; "
                "choose another --out or delete it"
            )
    start = time.perf_counter()
    calibration = calibration_samples(
        model.tokenizer, config.n_samples, config.seq_len, source=config.calib
    )
    variants = build_variants(model, config, calibration, progress)
    compute = choose_dtype("cpu", config.dtype)
    base = _base_logits(model, config, compute)
    results["seconds"]["plans"] = results["seconds"].get("plans", 0) + time.perf_counter() - start
    todo = [v for v in variants if v.key not in results["variants"]]
    bar = tqdm(
        total=len(variants),
        initial=len(variants) - len(todo),
        desc="measuring",
        disable=not progress,
        unit="model",
    )
    for variant in todo:
        bar.set_postfix_str(f"{variant.options or ''} {variant.label}".strip())
        t0 = time.perf_counter()
        measured = model.module
        if variant.plan is not None:
            measured = quantize_model(
                model.module, variant.plan, config.rounding, calibration, progress=False
            )
        divergence = base.compare(measured, compute_dtype=compute.dtype)
        tasks = None
        if config.tasks:
            tasks = evaluate_tasks(
                measured,
                model.tokenizer,
                config.tasks,
                config.limit,
                config.eval_batch_size,
                dtype=compute.dtype,
                docs=config.docs,
                quiet=quiet,
            ).to_dict()
            tasks.pop("lm_eval", None)  # keep results.json readable: per-task numbers only
        del measured
        results["variants"][variant.key] = {
            "label": variant.label,
            "options": variant.options,
            "recipe": variant.recipe,
            "budget": variant.budget,
            "plan": None if variant.plan is None else variant.plan.to_dict(),
            "divergence": divergence.to_dict(),
            "tasks": tasks,
            "seconds": time.perf_counter() - t0,
        }
        write_json_atomic(results_path, results)
        bar.update()
    bar.close()
    results["seconds"]["total"] = time.perf_counter() - start
    # Keep the variants in the order of this run (resumed ones first otherwise).
    results["variants"] = {v.key: results["variants"][v.key] for v in variants}
    write_json_atomic(results_path, results)
    for variant in variants:
        if variant.plan is not None and variant.recipe == "bitplan":
            variant.plan.save(
                out / "plans" / f"{variant.key.replace('|', '_').replace(',', '+')}.json"
            )
    return results
