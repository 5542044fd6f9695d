"""The Plan value: layer -> format, with the budget it was made for and what it achieves.

Plans are written as JSON; ``Plan.load(path)`` reads them back. ``PLAN_VERSION`` changes when
the file's meaning changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitplan.errors import BitplanError
from bitplan.formats import parse_format
from bitplan.formats.gguf import GGUFFormat
from bitplan.jsonio import read_json_object, write_json_atomic

PLAN_VERSION = 1
#: How a plan's weights are rounded: to nearest, by GPTQ (bitplan/quantization/gptq.py), or by GPTQ
#: and then tuned on each block's output (bitplan/quantization/tune.py). A plan
#: records the rounding it was made for, and ``bitplan quantize`` applies it by default.
ROUNDINGS = ("rtn", "gptq", "tuned")


def scored_rounding(rounding: str) -> str:
    """The rounding the scores assume for a plan made for ``rounding``: tuned plans are scored
    for GPTQ, their starting point (tuning every option of every layer would cost a tuning run
    per option)."""
    return "gptq" if rounding == "tuned" else rounding


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
    rounding: str = "rtn"  # ROUNDINGS: what the scores assumed, what quantize does by default
    serve: str | None = None  # the engine it was made for (bitplan.serving), checked on export
    version: int = PLAN_VERSION

    def format_counts(self, shapes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, int]:
        """Layers per format. With the layers' ``shapes`` (name -> (out, in)), a GGUF type that
        llama.cpp stores in its fallback type for that shape (rows that don't divide into its
        blocks) is counted under what the file holds: ``iq1_m→iq4_nl``."""
        counts: dict[str, int] = {}
        for layer, name in self.layer_formats.items():
            fmt = parse_format(name) if shapes is not None and layer in shapes else None
            if isinstance(fmt, GGUFFormat):
                stored = fmt.tensor_type(shapes[layer])
                name = name if stored == fmt.type_name else f"{name}→{stored.lower()}"
            counts[name] = counts.get(name, 0) + 1
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
        plan = cls(**data)
        plan._check_types()
        return plan

    def _check_types(self) -> None:
        """Raise TypeError for a field of the wrong kind (a plan file edited by hand)."""
        number = (int, float)
        expected = {
            "model": (self.model, str),
            "recipe": (self.recipe, str),
            "avg_bits": (self.avg_bits, number),
            "budget_avg_bits": (self.budget_avg_bits, (*number, type(None))),
            "include_scales": (self.include_scales, bool),
            "include_head": (self.include_head, bool),
            "rounding": (self.rounding, str),
            "serve": (self.serve, (str, type(None))),
        }
        for name, (value, kind) in expected.items():
            # bool is an int to Python, but not a number of bits
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise TypeError(f"{name} is {value!r}")
        for name in ("layer_formats", "group_formats"):
            table = getattr(self, name)
            if not isinstance(table, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in table.items()
            ):
                raise TypeError(f"{name} is not a mapping of names to format names")
        if not isinstance(self.options, list) or not all(isinstance(o, str) for o in self.options):
            raise TypeError("options is not a list of format names")
        if self.rounding not in ROUNDINGS:
            raise TypeError(f"rounding is {self.rounding!r}, not one of {', '.join(ROUNDINGS)}")

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise BitplanError(f"no plan file at {path}")
        data = read_json_object(path, "a plan file")
        try:
            return cls.from_dict(data)
        except TypeError as err:
            raise BitplanError(f"{path} is not a bitplan plan: {err}") from err
