"""The budgeted choice of one format per choice unit: exact solver, Pareto front, baselines.

Pure Python, numpy and scipy; it knows nothing about torch or models. ``Unit`` carries costs
in bits and predicted losses; ``solve`` returns the least-loss choice within each budget and
says whether that is proven optimal; ``uniform``, ``head`` and ``tail`` are the reference's
comparison recipes.
"""

from bitplan.solve.baselines import head, tail, uniform
from bitplan.solve.exact import pareto_front, reachable_range, solve
from bitplan.solve.problem import Solution, Unit

__all__ = [
    "Solution",
    "Unit",
    "head",
    "pareto_front",
    "reachable_range",
    "solve",
    "tail",
    "uniform",
]
