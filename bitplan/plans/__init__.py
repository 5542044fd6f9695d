"""The plans stage: from a model's layer table, formats and scores to Plans.

``plan.py`` is the Plan value (what a plan file holds). ``build.py`` builds plans: the
:class:`PlanSpace` a plan chooses among (solver units, built once per search, and pins), and
:func:`build_plan`, the one Plan builder that solved plans, recipes and explicit plans all go
through. ``recipes.py`` holds the plans made by a rule (uniform/head/tail baselines, llama.cpp's
mixes) and the plans solved per layer without fusion groups (GGUF, the unfused ablation). The
solver beneath (``bitplan.solve``) knows nothing about models.
"""

from bitplan.plans.build import (
    PlanSpace,
    build_plan,
    plan_from_formats,
    planning_table,
    resolve_pins,
    solve_plans,
)
from bitplan.plans.plan import PLAN_VERSION, Plan
from bitplan.plans.recipes import (
    BUDGETED_RECIPES,
    LLAMA_CPP_MIXES,
    RECIPES,
    baseline_plan,
    llama_cpp_mix_plan,
    mix_layer_type,
    mix_tensor_types,
    recipe_plan,
    solve_gguf_plans,
    solve_unfused_plans,
    uniform_gguf_plan,
)

__all__ = [
    "BUDGETED_RECIPES",
    "LLAMA_CPP_MIXES",
    "PLAN_VERSION",
    "RECIPES",
    "Plan",
    "PlanSpace",
    "baseline_plan",
    "build_plan",
    "llama_cpp_mix_plan",
    "mix_layer_type",
    "mix_tensor_types",
    "plan_from_formats",
    "planning_table",
    "recipe_plan",
    "resolve_pins",
    "solve_gguf_plans",
    "solve_plans",
    "solve_unfused_plans",
    "uniform_gguf_plan",
]
