"""The Scores value: for every layer and option, a predicted increase of the model's loss."""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field

from bitplan.jsonio import write_json_atomic
from bitplan.model.layers import LayerTable, expert_index

SCORES_VERSION = 1


def fill_unrouted_experts(
    values: dict[str, dict[str, float]], unseen: set[str]
) -> dict[str, dict[str, float]]:
    """Give each MoE expert projection that no calibration token reached the mean score of the
    routed experts of the same block and projection, with a warning naming how many.

    Other layers always see every token; an unseen one is left as it is (score 0)."""
    experts_unseen = sorted(n for n in unseen if expert_index(n) is not None)
    if not experts_unseen:
        return values

    def kind(name: str) -> str:  # ".../experts.<e>.down_proj" -> (".../experts", "down_proj")
        return re.sub(r"\.experts\.\d+\.", ".experts.*.", name)

    routed: dict[str, list[dict[str, float]]] = {}
    for name, by_option in values.items():
        if expert_index(name) is not None and name not in unseen:
            routed.setdefault(kind(name), []).append(by_option)
    for name in experts_unseen:
        peers = routed.get(kind(name), [])
        if peers:
            values[name] = {opt: sum(p[opt] for p in peers) / len(peers) for opt in values[name]}
    n_experts = len({re.sub(r"\.[^.]+$", "", n) for n in experts_unseen})
    warnings.warn(
        f"{n_experts} expert(s) ({len(experts_unseen)} projections) were never routed to by the "
        "calibration data; they get the mean score of their block's routed experts. Use more "
        "or more varied calibration samples to score them for real.",
        stacklevel=2,
    )
    return values


@dataclass
class Scores:
    """Predicted loss increase (nats per token) if one layer alone takes one option."""

    scorer: str  # one of bitplan.scoring.SCORERS
    options: list[str]  # format names, in the order given
    layer_scores: dict[str, dict[str, float]]  # layer name -> option -> score
    model_id: str = ""
    data_id: str = ""
    n_tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    version: int = SCORES_VERSION

    def group_scores(self, table: LayerTable, include_head: bool = False) -> dict[str, dict]:
        """Fusion group -> option -> summed score of its layers."""
        out: dict[str, dict[str, float]] = {}
        for group, layers in table.groups(include_head).items():
            out[group] = {
                opt: sum(self.layer_scores[layer.name][opt] for layer in layers)
                for opt in self.options
            }
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scores:
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically (a temporary file renamed into place)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        with open(path) as f:
            return cls.from_dict(json.load(f))
