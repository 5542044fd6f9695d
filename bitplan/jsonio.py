"""Writing JSON files atomically; the writer lives in :mod:`bitplan.atomic` with the other
atomic writers, and is named here too because plans, scores and benchmarks import it from here."""

from bitplan.atomic import write_json_atomic

__all__ = ["write_json_atomic"]
