"""The document budget (``--docs``): allocation over tasks and MMLU subjects, and the documents
lm-eval is then asked for."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.errors import BitplanError
from bitplan.evaluation import evaluate_tasks
from bitplan.evaluation.budget import (
    DOCUMENT_SECONDS,
    MIN_PER_TASK,
    _proportional,
    allocate,
    document_samples,
    minimum_documents,
)
from bitplan.evaluation.command import add_eval_arguments, check_eval_arguments

# The real tasks' sizes (MMLU reduced to a few subjects, the others as shipped).
SIZES = {
    "lambada_openai": {"lambada_openai": 5153},
    "hellaswag": {"hellaswag": 10042},
    "piqa": {"piqa": 1838},
    "winogrande": {"winogrande": 1267},
    "mmlu": {f"mmlu_{i}": 100 + 7 * i for i in range(10)},
}


@settings(max_examples=60, deadline=None)
@given(total=st.integers(4 * MIN_PER_TASK + 10, 40_000))
def test_allocation_spends_the_budget_within_each_tasks_bounds(total):
    counts = allocate(total, SIZES)
    available = {task: sum(leaves.values()) for task, leaves in SIZES.items()}
    assert sum(counts.values()) == pytest.approx(min(total, sum(available.values())), abs=3)
    for task, count in counts.items():
        assert max(MIN_PER_TASK, len(SIZES[task])) <= count <= available[task]


def test_uncapped_tasks_get_documents_in_inverse_root_of_their_cost():
    counts = allocate(1000, SIZES)
    for a in counts:
        for b in counts:
            expected = math.sqrt(DOCUMENT_SECONDS[b] / DOCUMENT_SECONDS[a])
            assert counts[a] / counts[b] == pytest.approx(expected, rel=0.03)


def test_a_task_with_too_few_documents_gives_its_share_to_the_others():
    sizes = {**SIZES, "winogrande": {"winogrande": 20}}
    counts = allocate(1000, sizes)
    assert counts["winogrande"] == 20
    assert sum(counts.values()) == pytest.approx(1000, abs=3)


def test_too_small_a_budget_is_refused():
    with pytest.raises(BitplanError, match="at least 26"):
        allocate(25, SIZES)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(11, 1200))  # allocate() gives MMLU at least one per subject
def test_mmlu_subjects_get_shares_by_size_at_least_one_each(count):
    sizes = {**SIZES["mmlu"], "mmlu_tiny": 3}  # one subject far smaller than the others
    counts = _proportional(count, sizes)
    assert sum(counts.values()) == min(count, sum(sizes.values()))
    for subject, n in counts.items():
        assert 1 <= n <= sizes[subject]
    # A larger subject never gets fewer questions than a smaller one (below its size).
    by_size = sorted(sizes, key=sizes.get)
    assert all(
        counts[a] <= counts[b] or counts[b] == sizes[b]
        for a, b in zip(by_size, by_size[1:], strict=False)
    )


def test_mmlu_shares_are_proportional_when_every_subject_has_one():
    sizes = SIZES["mmlu"]
    total = sum(sizes.values())
    counts = _proportional(total // 2, sizes)
    for subject, n in counts.items():
        assert abs(n - sizes[subject] * (total // 2) / total) <= 1


def test_document_samples_are_seeded_nested_and_sorted():
    tasks = ["lambada_openai", "hellaswag", "piqa", "winogrande", "mmlu"]
    small, per_task = document_samples(200, tasks)
    assert document_samples(200, tasks)[0] == small  # the same every call
    large, _ = document_samples(600, tasks)
    assert len([leaf for leaf in small if leaf.startswith("mmlu_")]) == 57
    assert sum(len(indices) for indices in small.values()) == sum(per_task.values())
    for leaf, indices in small.items():
        assert indices == sorted(set(indices)) and indices, leaf
        assert set(indices) <= set(large[leaf]), leaf  # a larger budget keeps these
    assert small != document_samples(200, tasks, seed=1)[0]


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_evaluate_with_a_budget_reads_the_allocated_documents(offline, tiny_model, tiny_tokenizer):
    tasks = ["piqa", "winogrande", "mmlu"]
    results = evaluate_tasks(tiny_model, tiny_tokenizer, tasks=tasks, docs=90)
    samples, per_task = document_samples(90, tasks)
    assert results.docs == 90 and results.limit is None
    assert {task: score.n for task, score in results.scores.items()} == per_task
    expected = {f"{leaf}/{index}" for leaf in samples for index in samples[leaf]}
    read = {key for documents in results.documents.values() for key in documents}
    assert read == expected
    with pytest.raises(BitplanError, match="not both"):
        evaluate_tasks(tiny_model, tiny_tokenizer, tasks=tasks, docs=90, limit=2)


def test_docs_and_limit_are_exclusive_and_small_budgets_refused_before_loading():
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--docs", "100", "--limit", "3"])
    assert minimum_documents(["mmlu", "piqa"]) == 57 + MIN_PER_TASK
    args = parser.parse_args(["--tasks", "mmlu,piqa", "--docs", "60"])
    with pytest.raises(BitplanError, match="at least 61"):
        check_eval_arguments(args)


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_commands_refuse_a_budget_too_small_before_loading(command, capsys):
    from bitplan.cli import main

    assert main([command, "/nonexistent/model", "--docs", "10"]) == 2
    assert "--docs 10 is too few for these tasks: give at least 73" in capsys.readouterr().err
