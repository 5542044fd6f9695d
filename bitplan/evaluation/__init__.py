"""Measuring a model: task accuracy through lm-eval, and divergence from the base model."""

from bitplan.evaluation.command import add_eval_arguments
from bitplan.evaluation.divergence import BaseLogits, Divergence
from bitplan.evaluation.harness import TaskResults, TaskScore, evaluate_tasks, format_results_table

__all__ = [
    "BaseLogits",
    "Divergence",
    "TaskResults",
    "TaskScore",
    "add_eval_arguments",
    "evaluate_tasks",
    "format_results_table",
]
