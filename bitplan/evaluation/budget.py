"""A document budget: about N documents in all, spread over the tasks so that the five-task
average is as precise as the time allows (``--docs N``; lm-eval's ``--limit`` stays per task).

The average keeps the reference's definition, the mean of the task accuracies (MMLU's is the
mean over its questions). With ``n_t`` documents of task ``t``, each costing ``c_t`` seconds,
the variance of the average is ``Σ v_t / n_t / T²``; for a fixed time ``Σ c_t n_t`` it is
smallest when ``n_t ∝ sqrt(v_t / c_t)`` (Neyman allocation). Per-document variances are not
known before the run and differ little between tasks at these accuracies, so ``v_t`` is taken
equal: ``n_t ∝ 1 / sqrt(c_t)``, with ``c_t`` measured (``DOCUMENT_SECONDS``). A task that has
fewer documents than its share gets them all; the rest goes to the others.

MMLU is stratified over its 57 subjects, in proportion to their sizes, at least one question
each (lm-eval's MMLU group weights subjects by the questions evaluated, so proportional
allocation keeps its accuracy an unbiased estimate of the full one). Every task's documents
are the first ones of a permutation seeded by the task's name: the same documents for every
variant and every run, and a larger budget keeps the documents of a smaller one.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence

from bitplan.data.offline_tasks import OFFLINE_TASKS
from bitplan.errors import BitplanError
from bitplan.evaluation.tasks import task_manager

#: Seconds per document of each task: SmolLM2-135M in float32, batch size 8, Intel Xeon with
#: 2 cores, 2026-12-06 (``benchmarks/eval_cost.py``; docs/BENCHMARKS.md). Only their ratios
#: matter.
DOCUMENT_SECONDS = {
    "lambada_openai": 0.066,
    "hellaswag": 0.292,
    "piqa": 0.074,
    "winogrande": 0.047,
    "mmlu": 0.121,
}

#: The fewest documents a task other than MMLU gets (MMLU: one per subject).
MIN_PER_TASK = 4


def check_budget(total: int, fewest: int) -> None:
    """Refuse a budget below ``fewest`` documents, saying what it must cover."""
    if total < fewest:
        raise BitplanError(
            f"--docs {total} is too few for these tasks: give at least {fewest} "
            "(one per MMLU subject, a few per other task)"
        )


def minimum_documents(tasks: Sequence[str]) -> int:
    """The smallest budget for the standard ``tasks`` (without loading them)."""
    from bitplan.data.shipped import mmlu_subjects

    return sum(len(mmlu_subjects()) if task == "mmlu" else MIN_PER_TASK for task in tasks)


def task_sizes(tasks: Sequence[str]) -> dict[str, dict[str, int]]:
    """Standard task name -> {lm-eval leaf task: documents} (MMLU: its 57 subjects)."""
    return {task: dict(_leaf_sizes(task)) for task in tasks}


@functools.cache
def _leaf_sizes(task: str) -> tuple[tuple[str, int], ...]:
    """lm-eval's own count of each leaf task's evaluation documents (the tasks are built once
    per process and reused by the evaluation)."""
    leaves = task_manager().load([OFFLINE_TASKS[task]])["tasks"]
    return tuple(sorted((name, len(leaf.eval_docs)) for name, leaf in leaves.items()))


def allocate(
    total: int,
    sizes: Mapping[str, Mapping[str, int]],
    seconds: Mapping[str, float] = DOCUMENT_SECONDS,
) -> dict[str, int]:
    """Documents per task (standard names of ``sizes``) summing to about ``total``."""
    available = {task: sum(leaves.values()) for task, leaves in sizes.items()}
    minimum = {task: max(MIN_PER_TASK, len(leaves)) for task, leaves in sizes.items()}
    minimum = {task: min(minimum[task], available[task]) for task in sizes}
    check_budget(total, sum(minimum.values()))
    weight = {task: 1 / math.sqrt(seconds[task]) for task in sizes}
    counts: dict[str, int] = {}
    left, open_tasks = total, set(sizes)
    while open_tasks:
        # Tasks whose share is more than they have, or less than their minimum, are fixed
        # there; the others share what is left.
        share = {t: left * weight[t] / sum(weight[u] for u in open_tasks) for t in open_tasks}
        fixed = {t: available[t] for t in open_tasks if share[t] >= available[t]}
        fixed = fixed or {t: minimum[t] for t in open_tasks if share[t] < minimum[t]}
        if not fixed:
            counts |= {t: round(share[t]) for t in open_tasks}
            break
        counts |= fixed
        left -= sum(fixed.values())
        open_tasks -= set(fixed)
    return {task: counts[task] for task in sizes}


def _proportional(count: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """``count`` spread over strata in proportion to ``sizes``, at least one each: strata whose
    share is below one get one, the others share the rest (largest remainders)."""
    if count >= sum(sizes.values()):
        return dict(sizes)
    counts = {}
    left, open_strata = count, dict(sizes)
    while open_strata:
        total = sum(open_strata.values())
        exact = {name: left * size / total for name, size in open_strata.items()}
        lifted = [name for name in open_strata if exact[name] < 1]
        if not lifted:
            break
        for name in lifted:
            counts[name] = 1
            del open_strata[name]
        left -= len(lifted)
    counts |= {name: math.floor(exact[name]) for name in open_strata}
    for name in sorted(open_strata, key=lambda name: counts[name] - exact[name]):
        if sum(counts.values()) >= count:
            break
        counts[name] += 1
    return {name: counts[name] for name in sizes}


def document_samples(
    total: int, tasks: Sequence[str], seed: int = 0
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """lm-eval's ``samples``: {leaf task: sorted document indices} for a budget of ``total``
    documents over the standard ``tasks``, and the documents each task got."""
    sizes = task_sizes(tasks)
    per_task = allocate(total, sizes)
    samples: dict[str, list[int]] = {}
    for task, count in per_task.items():
        for leaf, leaf_count in _proportional(count, sizes[task]).items():
            order = list(range(sizes[task][leaf]))
            random.Random(f"{seed}:{leaf}").shuffle(order)
            # Sorted: lm-eval maps its n-th selected document to the n-th index given.
            samples[leaf] = sorted(order[:leaf_count])
    return samples, per_task
