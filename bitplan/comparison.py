"""``bitplan compare``: the reference's tables, end to end, in one process.

Scores once per option set and rounding, solves every budget, builds every baseline recipe,
then for each variant in turn (one model copy at a time) fake-quantizes the model, rounded as
its rounding says, and measures it: task accuracy through lm-eval and KL divergence from the
unquantized model on held-out text. Every finished variant is written to ``results.json`` at
once, so an interrupted run resumes where it stopped when started again with the same
configuration; a run that asks for another rounding adds its rows to those already measured.
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
from bitplan.plans.plan import ROUNDINGS, scored_rounding
from bitplan.quantization.sequential import check_rounding_formats, quantize_model
from bitplan.scoring import DEFAULT_SCORER, score

RESULTS_VERSION = 2  # 2: variants carry their rounding; config lists roundings


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
    # Each plan is measured once per rounding (ROUNDINGS), our plans scored for it.
    roundings: list[str] = field(default_factory=lambda: ["rtn"])

    def __post_init__(self) -> None:
        if isinstance(self.roundings, str):
            self.roundings = self.roundings.split(",")
        if not self.roundings or any(r not in ROUNDINGS for r in self.roundings):
            raise BitplanError(
                f"roundings must be a comma list of {', '.join(ROUNDINGS)}, "
                f"not {','.join(self.roundings)!r}"
            )
        # One order whatever the order asked for, so that resumed runs match.
        self.roundings = [r for r in ROUNDINGS if r in self.roundings]

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise BitplanError, before any loading, for an option that a rounding can't round."""
        for setting in self.settings:
            for rounding in self.roundings:
                check_rounding_formats(rounding, parse_format_list(setting.options))


#: How a rounding other than round-to-nearest is said after a variant's label.
ROUNDING_LABELS = {"gptq": "GPTQ", "tuned": "tuned"}


@dataclass
class Variant:
    """One model to measure: BF16, or a plan and how it is rounded."""

    key: str  # stable id, e.g. "mxfp4,mxfp8|bitplan|5", "mxfp4,mxfp8|bitplan|5|tuned"
    label: str  # "BF16", "Ours 5-bit", "Head layers 8-bit + tuned" ...
    options: str | None
    recipe: str  # "bf16", "bitplan", "uniform", "head", "tail"
    budget: float | None
    plan: Plan | None
    rounding: str = "rtn"

    @classmethod
    def of_plan(cls, options: str, recipe: str, budget: float | None, high_bits: str, plan: Plan):
        """The variant of ``plan``, rounded as the plan records; keys and labels of
        round-to-nearest variants are those of results written before roundings were added."""
        key = f"{options}|{recipe}|{'-' if budget is None else f'{budget:g}'}"
        label = _recipe_label(recipe, budget, high_bits)
        if plan.rounding != "rtn":
            key += f"|{plan.rounding}"
            label += f" + {ROUNDING_LABELS[plan.rounding]}"
        return cls(key, label, options, recipe, budget, plan, plan.rounding)


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
    """Score, solve and build baselines for every setting and rounding: the list of models to
    measure."""
    variants = [Variant("bf16", "BF16", None, "bf16", None, None)]
    for setting in config.settings:
        formats = parse_format_list(setting.options)
        high = max(formats, key=lambda f: f.bits_per_weight((4096, 4096), False))
        high_bits = f"{high.bits_per_weight((4096, 4096), False):g}-bit"
        space = PlanSpace.build(model.layers, formats, include_scales=config.include_scales)
        for rounding in config.roundings:
            scores = score(
                model,
                formats,
                calibration,
                scorer=config.scorer,
                progress=progress,
                dtype=config.dtype,
                rounding=scored_rounding(rounding),
            )
            plans = [
                (plan.budget_avg_bits, "bitplan", plan)
                for plan in space.solve(scores, setting.budgets, model.identity)
            ]
            for recipe in setting.recipes:
                budgets = setting.budgets if recipe in BUDGETED_RECIPES else [None]
                plans += [
                    (b, recipe, recipe_plan(space, recipe, b, model.identity)) for b in budgets
                ]
            for budget, recipe, plan in plans:
                plan.rounding = rounding
                variants.append(Variant.of_plan(setting.options, recipe, budget, high_bits, plan))
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


def _upgraded(results: dict) -> dict:
    """``results`` as this version writes them. Results of one ``rounding`` (before compare took
    several) keyed and labelled every variant without it; before that, every plan was RTN."""
    config = results.setdefault("config", {})
    if "roundings" in config:
        return results
    rounding = config.pop("rounding", "rtn")
    config["roundings"] = [rounding]
    variants = {}
    for key, variant in results.get("variants", {}).items():
        if key != "bf16" and rounding != "rtn":
            key += f"|{rounding}"
            variant["label"] += f" + {ROUNDING_LABELS[rounding]}"
        variants[key] = {**variant, "rounding": "rtn" if key == "bf16" else rounding}
    results["variants"] = variants
    results["version"] = RESULTS_VERSION
    return results


def _without_roundings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "roundings"}


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
        previous = _upgraded(json.loads(results_path.read_text()))
        previous_roundings = previous["config"].pop("roundings")
        if previous["config"] == _without_roundings(results["config"]) and (
            previous.get("model") == model.identity
        ):
            # Rows of other roundings stay: the folder gathers every rounding measured in it.
            measured = set(previous_roundings) | set(config.roundings)
            results = previous
            results["config"] = config.to_dict()
            results["config"]["roundings"] = [r for r in ROUNDINGS if r in measured]
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
                model.module, variant.plan, variant.rounding, calibration, progress=False
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
            "rounding": variant.rounding,
            "plan": None if variant.plan is None else variant.plan.to_dict(),
            "divergence": divergence.to_dict(),
            "tasks": tasks,
            "seconds": time.perf_counter() - t0,
        }
        write_json_atomic(results_path, results)
        bar.update()
    bar.close()
    results["seconds"]["total"] = time.perf_counter() - start
    # Keep the variants in the order of this run (resumed ones first otherwise), then those of
    # roundings this run did not ask for.
    ordered = {v.key: results["variants"][v.key] for v in variants}
    results["variants"] = ordered | results["variants"]
    write_json_atomic(results_path, results)
    for variant in variants:
        if variant.plan is not None and variant.recipe == "bitplan":
            variant.plan.save(
                out / "plans" / f"{variant.key.replace('|', '_').replace(',', '+')}.json"
            )
    return results
