"""bitplan: budgeted mixed-precision quantization plans for LLMs.

    import bitplan

    model = bitplan.load()                                   # embedded default, a folder or a .gguf
    scores = bitplan.score_layers(model, ["mxfp4", "mxfp8"])  # one calibration pass, cached
    plans = bitplan.plan_budgets(model, scores, [4.5, 5, 6])  # {4.5: Plan, 5: Plan, 6: Plan}
    quantized = bitplan.apply(model, plans[5])               # fake-quantized torch model

    result = bitplan.search(model, "mxfp4,mxfp8", [4.5, 5, 6])  # all of it, as `bitplan search`

The modules behind these calls are imported on first use, so ``import bitplan`` stays cheap.
(The functions are not named ``score`` and ``solve``: those are sub-packages, and importing a
sub-package rebinds the package attribute of the same name. For the same reason ``search`` is
written in ``bitplan/plans/search.py``, not in a ``bitplan/search.py``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from bitplan.model import LoadedModel
    from bitplan.plans import Plan
    from bitplan.plans.search import SearchResult
    from bitplan.scoring import Scores

__all__ = ["apply", "load", "plan_budgets", "score_layers", "search"]


def load(source: str | None = None) -> LoadedModel:
    """A model from a Hugging Face folder, a .gguf file, or the embedded default (None)."""
    from bitplan.model import load_model

    return load_model(source)


def score_layers(
    model: LoadedModel,
    options: Sequence[str],
    tokens: torch.Tensor | None = None,
    scorer: str = "fisher",
    n_samples: int = 16,
    seq_len: int = 256,
    **kwargs: Any,
) -> Scores:
    """Predicted loss increase of every layer under every option. Without ``tokens``, uses
    ``n_samples`` x ``seq_len`` tokens of the shipped calibration text."""
    from bitplan.data.calibration import calibration_samples
    from bitplan.scoring import score as _score

    if tokens is None:
        tokens = calibration_samples(model.tokenizer, n_samples, seq_len)
    return _score(model, options, tokens, scorer=scorer, **kwargs)


def plan_budgets(
    model: LoadedModel,
    scores: Scores,
    avg_bits: float | Sequence[float],
    include_scales: bool = True,
    include_head: bool = False,
    pins: dict[str, str] | None = None,
) -> dict[float, Plan]:
    """The proven-optimal plan for each budget, keyed by budget."""
    from bitplan.formats import parse_format_list
    from bitplan.plans import solve_plans

    budgets = _budget_list(avg_bits)
    plans = solve_plans(
        model.layers,
        parse_format_list(scores.options),
        scores,
        budgets,
        model.identity,
        include_head=include_head,
        include_scales=include_scales,
        pins=pins,
    )
    return dict(zip(budgets, plans, strict=True))


def search(
    model: LoadedModel,
    options: str | Sequence[str],
    avg_bits: float | Sequence[float] = (),
    **settings: Any,
) -> SearchResult:
    """Score the layers on calibration text and solve every budget, as ``bitplan search`` does
    (without writing files: ``bitplan.plans.search.write_search_outputs`` writes them).

    ``settings`` are the other fields of ``bitplan.plans.search.SearchConfig`` (``recipe``,
    ``pins``, ``include_head``, ``include_scales``, ``scorer``, ``calib``, ``n_samples``,
    ``seq_len``, ``batch_size``, ``cache``, ``device``, ``dtype``, ``rounding``) and ``run_search``'s
    ``loader``, ``log`` and ``progress``."""
    from bitplan.plans.search import SearchConfig, run_search

    run_options = {k: settings.pop(k) for k in ("loader", "log", "progress") if k in settings}
    budgets = _budget_list(avg_bits)
    config = SearchConfig(options, budgets, **settings)
    return run_search(model, config, **run_options)


def apply(
    model: LoadedModel,
    plan: Plan,
    rounding: str | None = None,
    tokens: torch.Tensor | None = None,
    n_samples: int = 16,
    seq_len: int = 256,
    calib: str | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> torch.nn.Module:
    """A fake-quantized copy of the model's torch module (the original is left as it is),
    rounded as ``rounding`` says (``rtn``, ``gptq`` or ``tuned``; default: the plan's own
    ``rounding``).

    GPTQ rounds block by block on calibration ``tokens`` (default: ``n_samples`` x ``seq_len``
    tokens of ``calib``, the shipped text unless given); ``tuned`` then tunes each block's
    rounding on its output (integer formats). The codes and scales go to an export with
    ``bitplan.exporters.export_model(..., rounded=bitplan.quantization.rounded_weights(module))``.
    """
    from bitplan.data.calibration import calibration_samples
    from bitplan.quantization.sequential import quantize_model

    rounding = rounding or plan.rounding
    if rounding != "rtn" and tokens is None:
        tokens = calibration_samples(model.tokenizer, n_samples, seq_len, source=calib)
    return quantize_model(model.module, plan, rounding, tokens, batch_size, progress)


def _budget_list(avg_bits: float | Sequence[float]) -> list[float]:
    """One budget or several, as a list."""
    return [avg_bits] if isinstance(avg_bits, (int, float)) else list(avg_bits)
