"""lm-eval on a model in memory, through bitplan's offline tasks (tiny model, tiny limits)."""

from __future__ import annotations

import argparse
import json

import pytest

import bitplan
from bitplan.evaluation import add_eval_arguments, evaluate_tasks, format_results_table


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_evaluate_two_tasks_and_write_json(offline, tmp_path, tiny_model, tiny_tokenizer):
    out = tmp_path / "results.json"
    results = evaluate_tasks(
        tiny_model, tiny_tokenizer, tasks="bitplan_piqa,lambada_openai", limit=3, output_json=out
    )
    assert list(results.scores) == ["piqa", "lambada_openai"]
    piqa, lambada = results.scores["piqa"], results.scores["lambada_openai"]
    assert piqa.n == 3 and lambada.n == 3
    assert 0.0 <= piqa.acc <= 1.0 and piqa.acc_norm is not None
    assert lambada.acc_norm is None and "perplexity" in lambada.other
    assert results.average == pytest.approx((piqa.acc + lambada.acc) / 2)
    saved = json.loads(out.read_text())
    assert saved["average_acc"] == pytest.approx(results.average)
    assert saved["tasks"]["piqa"]["n"] == 3
    table = format_results_table(results)
    assert "piqa" in table and "lambada_openai" in table and "average (acc)" in table


def test_mmlu_is_the_57_subject_group(offline, tiny_model, tiny_tokenizer):
    results = evaluate_tasks(tiny_model, tiny_tokenizer, tasks=["mmlu"], limit=1)
    mmlu = results.scores["mmlu"]
    assert mmlu.n == 57
    subtasks = results.lm_eval["group_subtasks"]
    assert len(subtasks["bitplan_mmlu"]) == 4
    assert sum(len(subtasks[group]) for group in subtasks["bitplan_mmlu"]) == 57


def test_eval_arguments_and_the_library_call(offline, tmp_path, tiny):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--tasks", "winogrande", "--limit", "2", "--output", str(out)])
    assert args.limit == 2 and args.batch_size == 8
    results = bitplan.evaluate(
        tiny, tasks=args.tasks, limit=args.limit, dtype="float32", output=args.output
    )
    printed = str(results)
    assert "winogrande" in printed and "average (acc)" in printed
    assert json.loads(out.read_text())["tasks"]["winogrande"]["n"] == 2
    assert parser.parse_args(["--limit", "0.5"]).limit == 0.5


def test_documents_hold_each_documents_accuracy_and_correct_answers_loglik(
    offline, tiny_model, tiny_tokenizer
):
    """The per-document scores that paired comparisons use average to lm-eval's own accuracy
    for every task (MMLU's subjects pooled), with one log-likelihood per document."""
    tasks = "lambada_openai,hellaswag,piqa,winogrande,mmlu"
    results = evaluate_tasks(tiny_model, tiny_tokenizer, tasks=tasks, limit=2)
    assert set(results.documents) == set(results.scores)
    for task, score in results.scores.items():
        documents = results.documents[task]
        assert len(documents) == score.n, task
        accs = [acc for acc, _ in documents.values()]
        assert sum(accs) / len(accs) == pytest.approx(score.acc), task
        assert all(loglik <= 0 for _, loglik in documents.values()), task
    assert len(results.documents["mmlu"]) == 2 * 57


def test_the_correct_answer_of_each_kind_of_document():
    from bitplan.evaluation.harness import documents_from_samples

    samples = {
        "winogrande": [{"doc_id": 0, "doc": {"answer": "2"}, "target": "x", "acc": 1.0,
                        "filtered_resps": [[-3.0, False], [-1.0, True]]}],
        "piqa": [{"doc_id": 4, "doc": {}, "target": 0, "acc": 0.0,
                  "filtered_resps": [[-2.5, False], [-0.5, True]]}],
        "lambada_openai": [{"doc_id": 1, "doc": {}, "target": " word", "acc": 1.0,
                            "filtered_resps": [[-0.25, True]]}],
        "mmlu_anatomy": [{"doc_id": 3, "doc": {}, "target": 2, "acc": 0.0,
                          "filtered_resps": [[-1.0, 0], [-2.0, 0], [-4.0, 0], [-3.0, 0]]}],
    }  # fmt: skip
    documents = documents_from_samples(samples, ["winogrande", "piqa", "lambada_openai", "mmlu"])
    assert documents == {
        "winogrande": {"winogrande/0": [1.0, -1.0]},
        "piqa": {"piqa/4": [0.0, -2.5]},
        "lambada_openai": {"lambada_openai/1": [1.0, -0.25]},
        "mmlu": {"mmlu_anatomy/3": [0.0, -4.0]},
    }


def test_scoring_only_the_answers_gives_lm_evals_own_results(
    offline, monkeypatch, tiny_model, tiny_tokenizer
):
    """ContinuationLM (the head on scored positions only) against lm-eval's own HFLM code on
    the same documents of every task: the same accuracy per document, the same log-likelihoods
    up to float rounding."""
    from bitplan.evaluation.continuation_lm import ContinuationLM

    tasks = "lambada_openai,hellaswag,piqa,winogrande,mmlu"
    ours = evaluate_tasks(tiny_model, tiny_tokenizer, tasks=tasks, limit=2, batch_size=3)
    monkeypatch.setattr(ContinuationLM, "_takes_logits_to_keep", lambda self: False)
    reference = evaluate_tasks(tiny_model, tiny_tokenizer, tasks=tasks, limit=2, batch_size=3)
    assert ours.documents.keys() == reference.documents.keys()
    for task, documents in reference.documents.items():
        assert ours.documents[task].keys() == documents.keys(), task
        for key, (acc, loglik) in documents.items():
            assert ours.documents[task][key][0] == acc, key
            assert ours.documents[task][key][1] == pytest.approx(loglik, rel=1e-5, abs=1e-5), key
    assert {t: s.acc for t, s in ours.scores.items()} == {
        t: s.acc for t, s in reference.scores.items()
    }


def test_built_tasks_are_reused_without_changing_results(offline, tiny_model, tiny_tokenizer):
    """Tasks are built once per process: a later evaluation (other documents in between) gives
    the first one's results exactly, and reads its documents from the same task objects."""
    from bitplan.evaluation.tasks import task_manager

    tasks = "hellaswag,mmlu"
    first = evaluate_tasks(tiny_model, tiny_tokenizer, tasks=tasks, limit=2)
    built = dict(task_manager().built)
    evaluate_tasks(tiny_model, tiny_tokenizer, tasks=tasks, docs=80)
    again = evaluate_tasks(tiny_model, tiny_tokenizer, tasks=tasks, limit=2)
    assert again.documents == first.documents
    assert {t: s.acc for t, s in again.scores.items()} == {
        t: s.acc for t, s in first.scores.items()
    }
    assert all(task_manager().built[name] is obj for name, obj in built.items())
