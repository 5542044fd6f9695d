"""lm-eval's TaskManager over bitplan's offline tasks, each task built once per process."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from bitplan.data.offline_tasks import LM_EVAL_TASK_FOLDERS, TASKS_DIR


@functools.lru_cache(maxsize=1)
def task_manager() -> Any:
    """lm-eval's TaskManager over bitplan's offline tasks and the lm-eval task folders they wrap,
    building each list of tasks once per process.

    Indexing all of lm-eval's thousands of task files takes 6 s or more; these few take 0.1 s.
    Building a task reads its data and prepares every document (lm-eval's ``process_docs``;
    MMLU is 57 tasks), seconds per task, so every evaluation after the first (each variant of
    a compare) reuses the built tasks: lm-eval's ``evaluate`` rebuilds
    their requests on every call and keeps its results outside them.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    class ReusingTaskManager(TaskManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.built: dict[str, Any] = {}  # task or group name -> its Task or Group

        def load(self, task_list: Any) -> Any:
            names = task_list if isinstance(task_list, list) else [task_list]
            if not all(isinstance(name, str) for name in names):
                return super().load(task_list)
            for name in names:
                if name not in self.built:
                    loaded = super().load([name])
                    self.built[name] = loaded["groups"].get(name) or loaded["tasks"][name]
            return super().load([self.built[name] for name in names])

    lm_eval_tasks = Path(lm_eval.__file__).resolve().parent / "tasks"
    paths = [str(lm_eval_tasks / folder) for folder in LM_EVAL_TASK_FOLDERS]
    return ReusingTaskManager(include_defaults=False, include_path=[*paths, str(TASKS_DIR)])
