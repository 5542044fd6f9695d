"""The plans stage: from a model's layer table, formats and scores to Plans.

``plan.py`` is the Plan value (what a plan file holds); ``build.py`` builds plans (solver units,
pins, and the one Plan builder that solved plans, recipes and explicit plans all go through);
``recipes.py`` holds the plans made by a rule instead of by the solver. The solver beneath
(``bitplan.solve``) knows nothing about models.
"""

from bitplan.plans.build import RECIPES, baseline_plan, build_units, resolve_pins, solve_plans
from bitplan.plans.plan import PLAN_VERSION, Plan
from bitplan.plans.recipes import (
    LLAMA_CPP_MIXES,
    llama_cpp_mix_plan,
    mix_layer_type,
    mix_tensor_types,
    plan_from_formats,
    solve_gguf_plans,
    ungrouped,
    uniform_gguf_plan,
)

__all__ = [
    "LLAMA_CPP_MIXES",
    "PLAN_VERSION",
    "RECIPES",
    "Plan",
    "baseline_plan",
    "build_units",
    "llama_cpp_mix_plan",
    "mix_layer_type",
    "mix_tensor_types",
    "plan_from_formats",
    "resolve_pins",
    "solve_gguf_plans",
    "solve_plans",
    "ungrouped",
    "uniform_gguf_plan",
]
