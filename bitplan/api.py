"""The whole pipeline as eight library calls; ``bitplan/__init__.py`` exports them and the command
line is a thin layer over them.

    load -> score -> plan -> quantize -> export / evaluate
    search = score + plan (+ write the plan files);  compare = everything, as the seed's tables

Each call imports its stage on first use, so ``import bitplan`` stays cheap. The stages live in
sub-packages with other names (``scoring``, ``plans``, ``quantization``, ``exporters``,
``evaluation``, ``comparison``): importing a sub-package called ``score`` would rebind the
attribute ``bitplan.score`` to the module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from bitplan.comparison import Setting
    from bitplan.evaluation import TaskResults
    from bitplan.exporters.report import ExportReport
    from bitplan.model import LoadedModel
    from bitplan.plans import Plan
    from bitplan.plans.search import SearchResult
    from bitplan.scoring import Scores


def load(source: str | os.PathLike | None = None, stream: bool = False) -> LoadedModel:
    """A model from a Hugging Face folder, a Hub id (``owner/name``, from the Hugging Face cache),
    a ``.gguf`` file (converted once into the bitplan cache), a bundled model name
    (``smollm2-135m``, ``gemma3-270m``), or the embedded default (None).

    ``stream=True`` keeps the decoder blocks on disk (safetensors) and reads one block at a time
    while scoring and exporting: for models larger than memory."""
    if stream:
        from bitplan.model.streaming import load_streaming

        return load_streaming(source)[0]
    from bitplan.model import load_model

    return load_model(source)


def score(
    model: LoadedModel,
    options: str | Sequence[str],
    tokens: torch.Tensor | None = None,
    scorer: str | None = None,
    n_samples: int = 16,
    seq_len: int = 256,
    calib: str | None = None,
    **kwargs: Any,
) -> Scores:
    """Predicted loss increase of every layer under every option (``"mxfp4,mxfp8"`` or a list),
    from one calibration pass (cached on disk). Without ``tokens``, ``n_samples`` x ``seq_len``
    tokens of ``calib`` (a .txt, .jsonl or arrow folder; default: the shipped text).
    ``scorer``: one of ``bitplan.scoring.SCORERS`` (default ``DEFAULT_SCORER``). ``kwargs`` go
    to ``bitplan.scoring.score`` (``include_head``, ``batch_size``, ``cache``, ``device``,
    ``dtype``, ``rounding``, ``progress``)."""
    from bitplan.data.calibration import calibration_samples
    from bitplan.formats import parse_format_list
    from bitplan.scoring import DEFAULT_SCORER
    from bitplan.scoring import score as score_layers

    if tokens is None:
        tokens = calibration_samples(model.tokenizer, n_samples, seq_len, source=calib)
    formats = parse_format_list(options if isinstance(options, str) else list(options))
    return score_layers(model, formats, tokens, scorer=scorer or DEFAULT_SCORER, **kwargs)


def plan(
    model: LoadedModel,
    scores: Scores | None,
    avg_bits: float | Sequence[float] = (),
    *,
    recipe: str | None = None,
    options: str | Sequence[str] | None = None,
    pins: Sequence[str] = (),
    include_head: bool = False,
    include_scales: bool = True,
    serve: str | None = None,
) -> dict[float, Plan]:
    """Plans keyed by budget (average bits per weight): the proven-optimal plan of each budget
    for ``scores``, or, with ``recipe``, a baseline: ``uniform`` (every layer in the cheapest of
    ``options``; no budget, keyed by its own average bits), ``head`` / ``tail`` (whole blocks
    nearest the output / the embedding promoted while the budget allows; no scores needed).

    ``pins`` are ``"REGEX=FORMAT"``: layers forced to a format, counted in the budget (pinning
    ``lm_head`` brings it into the plan). ``include_scales=False`` counts element bits only, as
    the reference's tables do. ``serve`` (``vllm``, ``llama.cpp``, ``transformers``) keeps to
    what that engine can run (``bitplan.serving``) and records it in the plans."""
    from bitplan.errors import BitplanError
    from bitplan.formats import parse_format_list
    from bitplan.plans import PlanSpace, recipe_plan
    from bitplan.serving import check_model, check_options

    if scores is None and options is None:
        raise BitplanError("give the scores, or the options of a recipe (options='mxfp4,mxfp8')")
    names = options if options is not None else scores.options
    formats = parse_format_list(names if isinstance(names, str) else list(names))
    check_options(serve, formats)
    check_model(serve, getattr(model.module.config, "model_type", None))
    space = PlanSpace.with_pin_specs(
        model.layers, formats, pins, include_head, include_scales, serve
    )
    budgets = [avg_bits] if isinstance(avg_bits, (int, float)) else list(avg_bits)
    if recipe is not None:
        plans = [recipe_plan(space, recipe, b, model.identity) for b in budgets or [None]]
    elif scores is None:
        raise BitplanError("a solved plan needs scores: bitplan.score(model, options) first")
    else:
        plans = space.solve(scores, budgets, model.identity)
    return {p.budget_avg_bits if p.budget_avg_bits is not None else p.avg_bits: p for p in plans}


def quantize(
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
    rounded as ``rounding`` says (``rtn``, ``gptq`` or ``tuned``; default: the plan's own).

    GPTQ rounds block by block on calibration ``tokens`` (default: ``n_samples`` x ``seq_len``
    tokens of ``calib``, the shipped text unless given); ``tuned`` then tunes each block's
    rounding on its output. ``bitplan.export(..., quantized=module)`` stores
    the codes and scales it chose."""
    from bitplan.data.calibration import calibration_samples
    from bitplan.errors import BitplanError
    from bitplan.quantization.sequential import quantize_model

    if model.block_loader is not None:  # its blocks are on disk: no copy to fake-quantize
        raise BitplanError(
            "a streamed model cannot be fake-quantized in memory; bitplan.export(model, plan, "
            "out, rounding=...) rounds and writes it one block at a time"
        )
    rounding = rounding or plan.rounding
    if rounding != "rtn" and tokens is None:
        tokens = calibration_samples(model.tokenizer, n_samples, seq_len, source=calib)
    return quantize_model(model.module, plan, rounding, tokens, batch_size, progress)


def export(
    model: LoadedModel,
    plan: Plan,
    out: str | os.PathLike,
    format: str | None = None,
    *,
    serve: str | None = None,
    force: bool = False,
    quantized: torch.nn.Module | None = None,
    rounding: str | None = None,
    imatrix: bool = False,
    calib: str | None = None,
    n_samples: int = 16,
    seq_len: int = 256,
    batch_size: int = 4,
    **options: object,
) -> ExportReport:
    """Write ``model`` quantized by ``plan`` to ``out`` in ``format``: ``fake``, ``packed``,
    ``compressed-tensors`` (vLLM's checkpoint) or ``gguf`` (one llama.cpp file).

    ``serve`` (default: the engine the plan was made for, if any) checks the plan against that
    engine's rules (``bitplan.serving``) before anything is written, and picks its checkpoint
    format when ``format`` is not given (else ``gguf`` for a plan of llama.cpp types, ``packed``
    for any other).

    The weights are rounded as ``rounding`` says (default: the plan's own); a model already
    rounded by ``bitplan.quantize`` can be given as ``quantized`` instead, and its codes are
    stored as they are. ``imatrix`` writes a gguf file with an importance matrix collected on
    the calibration text (unless ``importance=`` gives one), as ``llama-quantize --imatrix``.
    An existing ``out`` is refused unless ``force`` (then replaced only
    once the new export is complete). ``options`` go to the back end (``max_shard_bytes``;
    gguf: ``embedding_type``, ``output_type``, ``importance``). Returns what was written, with
    sizes (``report.summary()``)."""
    from bitplan.data.calibration import calibration_samples
    from bitplan.exporters import check_importance_format, export_model
    from bitplan.quantization import rounded_weights
    from bitplan.scoring.importance import collect_importance
    from bitplan.serving import EXPORT_FORMATS, check_model, check_plan

    serve = serve or plan.serve
    format = format or EXPORT_FORMATS.get(serve) or _default_format(plan)
    shapes = {layer.name: layer.shape for layer in model.layers}
    notes = check_plan(serve, plan.layer_formats, shapes, format)  # before any work
    if serve is not None:
        check_model(serve, getattr(model.module.config, "model_type", None))
    check_importance_format(imatrix, format)
    if imatrix and "importance" not in options:
        tokens = calibration_samples(model.tokenizer, n_samples, seq_len, source=calib)
        options["importance"] = collect_importance(model, tokens, include_head=plan.include_head)
    rounding = rounding or plan.rounding
    if quantized is None and rounding != "rtn" and model.block_loader is not None:
        report = _export_streamed(model, plan, out, format, force, rounding, calib,
                                  n_samples, seq_len, batch_size, options)  # fmt: skip
        return dataclasses.replace(report, notes=report.notes + notes)
    if quantized is None and rounding != "rtn":
        quantized = quantize(model, plan, rounding, None, n_samples, seq_len, calib, batch_size)
    rounded = rounded_weights(quantized) if quantized is not None else None
    report = export_model(model, plan, out, format, force=force, rounded=rounded, **options)
    return dataclasses.replace(report, notes=report.notes + notes)


def _export_streamed(
    model: LoadedModel,
    plan: Plan,
    out: str | os.PathLike,
    format: str,
    force: bool,
    rounding: str,
    calib: str | None,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    options: dict,
) -> ExportReport:
    """``export`` of a streamed model rounded by GPTQ (or tuned): the blocks are rounded one at
    a time and their codes kept on disk, beside ``out``, until the export has stored them."""
    import tempfile

    from bitplan.data.calibration import calibration_samples
    from bitplan.exporters import export_model
    from bitplan.exporters.rounded_store import RoundedStore
    from bitplan.quantization.sequential import GPTQSettings, gptq_streamed

    tokens = calibration_samples(model.tokenizer, n_samples, seq_len, source=calib)
    beside = Path(out).absolute().parent
    with tempfile.TemporaryDirectory(prefix=".bitplan-rounded-", dir=beside) as folder:
        store = RoundedStore(folder)
        gptq_streamed(
            model.module,
            model.block_loader,
            plan.layer_formats,
            tokens,
            store.add,
            batch_size,
            settings=GPTQSettings.of(rounding),
        )
        return export_model(model, plan, out, format, force=force, rounded=store, **options)


def _default_format(plan: Plan) -> str:
    from bitplan.formats import parse_format
    from bitplan.formats.gguf import makes_a_gguf_file

    formats = [parse_format(name) for name in set(plan.layer_formats.values())]
    return "gguf" if makes_a_gguf_file(formats) else "packed"


def evaluate(
    model: LoadedModel,
    quantized: torch.nn.Module | None = None,
    tasks: str | Sequence[str] | None = None,
    *,
    limit: int | float | None = None,
    docs: int | None = None,
    batch_size: int | None = None,
    dtype: str = "auto",
    add_bos_token: bool | None = None,
    output: str | os.PathLike | None = None,
    quiet: bool = True,
) -> TaskResults:
    """Task accuracy through lm-eval, offline (default tasks: lambada_openai, hellaswag, piqa,
    winogrande, mmlu), of ``quantized`` (a module from ``bitplan.quantize``) or of the model
    itself.

    ``docs`` spends about that many documents in all, spread over the tasks (the same ones on
    every call); ``limit`` is lm-eval's: the first N of every task. ``dtype`` is what the model
    computes in (``auto``: bfloat16 where this CPU runs it faster). ``output`` also writes the
    results as JSON; ``quiet=False`` shows lm-eval's own log lines and bars. ``str(results)``
    is the table."""
    from bitplan.compute import choose_dtype
    from bitplan.data.offline_tasks import DEFAULT_TASKS
    from bitplan.evaluation.harness import DEFAULT_BATCH_SIZE, evaluate_tasks

    module = quantized if quantized is not None else model.module
    device = next(module.parameters()).device.type
    return evaluate_tasks(
        module,
        model.tokenizer,
        tasks=tasks or DEFAULT_TASKS,
        limit=limit,
        docs=docs,
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        add_bos_token=add_bos_token,
        output_json=output,
        quiet=quiet,
        dtype=choose_dtype(device, dtype).dtype,
    )


def search(
    model: LoadedModel,
    options: str | Sequence[str],
    avg_bits: float | Sequence[float] = (),
    out: str | os.PathLike | None = None,
    **settings: Any,
) -> SearchResult:
    """Score the layers on calibration text and solve every budget, as ``bitplan search`` does;
    with ``out``, also write the plan files, the Pareto front, the scores and a PNG there
    (``result.paths`` are the plan files).

    ``settings`` are the other fields of ``bitplan.plans.search.SearchConfig`` (``recipe``,
    ``pins``, ``include_head``, ``include_scales``, ``scorer``, ``calib``, ``n_samples``,
    ``seq_len``, ``batch_size``, ``cache``, ``device``, ``dtype``, ``rounding``, ``serve``,
    ``target_size``, ``imatrix``) and ``log``
    (a function given each line worth showing, e.g. ``print``) and ``progress``."""
    from bitplan.distributed import is_main
    from bitplan.plans.search import SearchConfig, run_search, write_search_outputs

    run_options = {k: settings.pop(k) for k in ("log", "progress") if k in settings}
    budgets = [avg_bits] if isinstance(avg_bits, (int, float)) else list(avg_bits)
    result = run_search(model, SearchConfig(options, budgets, **settings), **run_options)
    if out is not None and is_main():  # under torchrun, rank 0 alone writes
        result.paths = write_search_outputs(result, out)
    return result


def compare(
    model: LoadedModel,
    settings: Sequence[str | Setting] | None = None,
    out: str | os.PathLike | None = None,
    *,
    command: str = "",
    progress: bool = True,
    quiet: bool = True,
    **config: Any,
) -> Path:
    """The reference's tables on ``model``: every setting's plans and baselines, each measured
    (KL from the unquantized model on held-out text, task accuracy, paired differences), into
    ``out`` (default ``reports/<model name>``): ``report.md``, ``results.json``, plots. Returns
    the report's path. A second call with the same ``out`` and configuration resumes.

    ``settings``: ``"OPTIONS:BUDGETS[:RECIPES]"`` strings (default: MXFP4/MXFP8 at 4.5, 5, 6
    bits and W2/W4 at 3 bits, as the reference). ``config`` are the other fields of
    ``bitplan.comparison.CompareConfig`` (``tasks``, ``docs``, ``limit``, ``roundings`` ...);
    ``tasks=[]`` measures KL only. ``command`` is written into the report."""
    from bitplan.comparison import DEFAULT_SETTINGS, CompareConfig, Setting, run_compare
    from bitplan.data.offline_tasks import resolve_tasks
    from bitplan.evaluation.command import check_document_budget
    from bitplan.report import write_report

    chosen = [Setting.parse(s) if isinstance(s, str) else s for s in settings or DEFAULT_SETTINGS]
    if "tasks" in config:
        config["tasks"] = resolve_tasks(config["tasks"]) if config["tasks"] else []
    compare_config = CompareConfig(settings=chosen, **config)
    check_document_budget(compare_config.docs, compare_config.tasks)
    compare_config.check()
    folder = Path(out if out is not None else f"reports/{model.name}")
    results = run_compare(model, compare_config, folder, progress=progress, quiet=quiet)
    return write_report(results, folder, model.layers, command)
