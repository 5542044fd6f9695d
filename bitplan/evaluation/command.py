"""The ``bitplan eval`` sub-command's arguments and body (the CLI wires these to a loaded model)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from bitplan.atomic import check_output_file
from bitplan.data.offline_tasks import DEFAULT_TASKS, resolve_tasks
from bitplan.errors import BitplanError
from bitplan.evaluation.budget import check_budget, minimum_documents
from bitplan.evaluation.harness import (
    DEFAULT_BATCH_SIZE,
)


def _positive(text: str, option: str, convert: Callable[[str], float], kind: str) -> float:
    """``text`` read by ``convert``; an argparse error naming ``option`` unless it is a
    positive ``kind``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} must be {kind}, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{option} must be positive")
    return value


def parse_limit(text: str) -> int | float:
    """lm-eval's limit: a document count per task, or a fraction of each task if below 1."""
    value = _positive(text, "--limit", float, "a number")
    return value if value < 1 else int(value)


def parse_docs(text: str) -> int:
    """A document budget: a positive whole number."""
    return int(_positive(text, "--docs", int, "a whole number"))


def add_document_arguments(parser: argparse.ArgumentParser) -> None:
    """``--limit`` (lm-eval's, per task) or ``--docs`` (a budget over all tasks): which
    documents an evaluation reads."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--limit",
        type=parse_limit,
        default=None,
        help="evaluate only the first N documents of each task (each MMLU subject), "
        "or a fraction of each if below 1; default: all",
    )
    which.add_argument(
        "--docs",
        type=parse_docs,
        default=None,
        metavar="N",
        help="evaluate about N documents in all, spread over the tasks for the most precise "
        "average in the time (MMLU sampled across subjects; seeded, the same every run)",
    )


def check_document_budget(docs: int | None, tasks: str | list[str]) -> None:
    """Refuse a budget too small for ``tasks`` before any model is loaded."""
    if docs is not None:
        check_budget(docs, minimum_documents(resolve_tasks(tasks)))


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the evaluation options (everything but the model) to ``parser``."""
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated tasks, run offline from shipped data (default: {','.join(DEFAULT_TASKS)})",
    )
    add_document_arguments(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"lm-eval batch size (default {DEFAULT_BATCH_SIZE}, the fastest on a small CPU)",
    )
    parser.add_argument(
        "--add-bos-token",
        action="store_true",
        help="prepend the BOS token to every request (the reference report did so for Llama)",
    )
    parser.add_argument("--output", metavar="JSON", help="also write the results to this JSON file")


def check_eval_arguments(args: argparse.Namespace) -> None:
    """Refuse bad `bitplan eval` arguments before the model is loaded: unknown tasks, a
    document budget too small for them, a batch size below 1, an --output that cannot be
    written."""
    resolve_tasks(args.tasks)
    check_document_budget(args.docs, args.tasks)
    if args.batch_size < 1:
        raise BitplanError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.output:
        check_output_file(args.output, force=True)
