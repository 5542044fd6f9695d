"""The importance matrix of llama.cpp (``llama-imatrix``): for every Linear layer, the mean over
calibration tokens of each input column's square. GGUF quantization uses it to choose scales
(``llama-quantize --imatrix``); see docs/GGUF.md."""

from __future__ import annotations

import numpy as np
import torch

from bitplan.model.loading import LoadedModel


@torch.no_grad()
def collect_importance(
    model: LoadedModel, tokens: torch.Tensor, batch_size: int = 4, include_head: bool = True
) -> dict[str, np.ndarray]:
    """Layer name -> mean over calibration tokens of each input column's square, for every
    decoder Linear (and the head): what ``llama-imatrix`` collects."""
    layers = model.layers.selected(include_head)
    modules = dict(model.module.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [modules[layer.name].register_forward_hook(hook_for(layer.name)) for layer in layers]
    try:
        for batch in torch.split(tokens, batch_size):
            model.module(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}
