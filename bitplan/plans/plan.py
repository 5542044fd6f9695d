"""The Plan value: layer -> format, with the budget it was made for and what it achieves.

Plans are written as JSON; ``Plan.load(path)`` reads them back. ``PLAN_VERSION`` changes when
the file's meaning changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitplan.errors import BitplanError
from bitplan.jsonio import write_json_atomic

PLAN_VERSION = 1


@dataclass
class Plan:
    model: str  # model name and weight fingerprint
    recipe: str  # "bitplan" (solved), "uniform", "head", "tail", or a scorer-specific label
    options: list[str]  # the candidate formats
    layer_formats: dict[str, str]  # layer name -> format name, for every layer the plan covers
    budget_avg_bits: float | None  # the target; None for a plan made without one
    avg_bits: float  # achieved, counted as ``include_scales`` says
    avg_bits_with_scales: float
    avg_bits_without_scales: float
    include_scales: bool  # whether the budget counted scale/zero-point bits
    include_head: bool  # whether lm_head is in the plan and the budget
    predicted_loss: float | None = None  # summed scores of the choice (nats per token)
    scorer: str | None = None
    proven_optimal: bool = False
    group_formats: dict[str, str] = field(default_factory=dict)  # fusion group -> format
    version: int = PLAN_VERSION

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for fmt in self.layer_formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        version = data.get("version")
        if version != PLAN_VERSION:
            raise BitplanError(
                f"plan format version {version} is not supported (expected {PLAN_VERSION})"
            )
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise BitplanError(f"no plan file at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise BitplanError(f"{path} is not a plan file (invalid JSON: {err})") from err
        try:
            return cls.from_dict(data)
        except TypeError as err:
            raise BitplanError(f"{path} is not a bitplan plan: {err}") from err
