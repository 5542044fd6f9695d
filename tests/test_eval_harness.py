"""lm-eval on a model in memory, through bitplan's offline tasks (tiny model, tiny limits)."""

from __future__ import annotations

import argparse
import json

import pytest

from bitplan.evaluate import add_eval_arguments, evaluate_tasks, format_results_table
from bitplan.evaluate.command import run_eval_command


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


def test_eval_command_arguments(offline, capsys, tmp_path, tiny_model, tiny_tokenizer):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--tasks", "winogrande", "--limit", "2", "--output", str(out)])
    assert args.limit == 2 and args.batch_size == 8
    run_eval_command(args, tiny_model, tiny_tokenizer)
    printed = capsys.readouterr().out
    assert "winogrande" in printed and "average (acc)" in printed
    assert json.loads(out.read_text())["tasks"]["winogrande"]["n"] == 2
    assert parser.parse_args(["--limit", "0.5"]).limit == 0.5
