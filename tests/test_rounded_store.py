"""RoundedStore: rounded weights written to disk block by block come back exactly."""

from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.exporters.rounded_store import RoundedStore, rounded_facts
from bitplan.formats import parse_format
from bitplan.formats.registry import known_format_names
from bitplan.quantization.gptq import check_gptq_format


def _roundable(name: str) -> bool:
    try:
        check_gptq_format(parse_format(name))
    except BitplanError:
        return False
    return True


# Every format GPTQ can round: what a streamed GPTQ pass stores.
ROUNDABLE = [parse_format(name) for name in known_format_names() if _roundable(name)]


@pytest.mark.parametrize("fmt", ROUNDABLE, ids=str)
def test_rounded_weights_come_back_exactly(tmp_path, fmt):
    weights = {
        f"layer{i}": fmt.round_weight(
            torch.randn(8, 96, generator=torch.Generator().manual_seed(i))
        )
        for i in range(3)
    }
    store = RoundedStore(tmp_path)
    store.add({"layer0": weights["layer0"], "layer1": weights["layer1"]})
    store.add({"layer2": weights["layer2"]})
    store.add({})  # a block with no planned layer writes nothing
    assert len(list(tmp_path.iterdir())) == 2 and len(store) == 3 and list(store) == list(weights)
    # What an export checks is known without reading the elements back.
    assert rounded_facts(store) == rounded_facts(weights) and store.facts["layer2"].row_length == 96
    for name, weight in weights.items():
        got = store[name]
        assert got.block_size == weight.block_size and got.method == weight.method
        assert torch.equal(got.elements, weight.elements.float())
        for part in ("scale", "zero_point", "global_scale"):
            a, b = getattr(got.scales, part), getattr(weight.scales, part)
            assert (a is None and b is None) or torch.equal(a, b), part
        assert torch.equal(got.values(), weight.values())
