"""The budgeted choice of one format per choice unit: exact solver, Pareto front, baselines.

Pure Python, numpy and scipy; it knows nothing about torch or models. ``Unit`` carries costs
in bits and predicted losses; ``solve`` returns the least-loss choice within each budget and
says whether that is proven optimal; ``uniform`` and ``promote_blocks`` (from the output end or
the embedding end) are the reference's comparison recipes (``uniform``, ``head``, ``tail``).
"""

from bitplan.solve.baselines import promote_blocks, uniform
from bitplan.solve.exact import pareto_front, reachable_range, solve
from bitplan.solve.problem import Solution, Unit

__all__ = [
    "Solution",
    "Unit",
    "pareto_front",
    "promote_blocks",
    "reachable_range",
    "solve",
    "uniform",
]
