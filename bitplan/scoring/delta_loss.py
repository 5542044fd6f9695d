"""The reference's scorer (auto-round AutoScheme), for comparison: ``--scorer delta-loss``.

For each option in turn, the whole model is fake-quantized with that option and run forward and
backward on the calibration data; a layer's score is Σ |∂L/∂Ŵ ⊙ (W − Ŵ)| + Σ |∂L/∂X̂ ⊙ (X − X̂)|
(Ŵ, X̂ the quantized weight and input), summed over micro-batches, with L the mean next-token
loss. One full pass per option: its cost grows linearly with the number of options.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.compute import autocast
from bitplan.distributed import all_reduce_sum
from bitplan.formats import Format
from bitplan.model.layers import LayerInfo
from bitplan.model.logits import final_hidden_states
from bitplan.quantization import apply_formats
from bitplan.scoring.replay import loss_gradient


def _score_one_option(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    fmt: Format,
    batches: list[torch.Tensor],
    bar,
    dtype: torch.dtype,
) -> dict[str, float]:
    originals = {
        name: m.weight.detach() for name, m in model.named_modules() if hasattr(m, "weight")
    }
    quantized = apply_formats(model, {layer.name: fmt for layer in layers})
    modules = dict(quantized.named_modules())
    totals = {layer.name: 0.0 for layer in layers}
    for p in quantized.parameters():
        p.requires_grad_(False)

    def make_hook(name: str):
        module = modules[name]
        w_error = (originals[name].float() - module.weight.float()).detach()

        def hook(_module, inputs, output):
            x = inputs[0].detach()  # its quantized form is recomputed later, not kept: memory

            def on_grad(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    g = grad.reshape(-1, grad.shape[-1]).float()
                    x2 = x.reshape(-1, x.shape[-1]).float()
                    xq2 = fmt.quantize_activation(x2) if fmt.quantizes_activations else x2
                    grad_w = g.t() @ xq2  # ∂L/∂Ŵ
                    score = (grad_w * w_error).abs().sum()
                    if fmt.quantizes_activations:
                        grad_x = g @ module.weight.float()  # ∂L/∂X̂
                        score = score + (grad_x * (x2 - xq2)).abs().sum()
                    totals[name] += float(score)

            output.register_hook(on_grad)

        return hook

    # Gradients must flow from the loss back through every layer: start them at the embedding.
    embed = quantized.get_input_embeddings()
    handles = [embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))]
    handles += [
        modules[layer.name].register_forward_hook(make_hook(layer.name)) for layer in layers
    ]
    try:
        for batch in batches:
            # L is the batch's mean next-token loss; its logits are made a chunk at a time.
            with autocast("cpu", dtype):
                final = final_hidden_states(quantized, batch)
                mean = 1.0 / (batch.shape[0] * (batch.shape[1] - 1))
                grad = loss_gradient(
                    quantized, final, batch, through_final_norm=False, loss_scale=mean
                )
                final.backward(grad.to(final.dtype))
            bar.update()
    finally:
        for handle in handles:
            handle.remove()
    return totals


def delta_loss_scores(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    options: Sequence[Format],
    tokens: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, float]]:
    """Layer name -> option name -> the reference's |gradient x quantization error| score.

    ``dtype`` is what the passes compute in (autocast; ``bitplan.compute.choose_dtype``)."""
    batches = list(torch.split(tokens, batch_size))
    bar = tqdm(total=len(batches) * len(options), desc="scoring (delta-loss)", disable=not progress)
    per_option = {}
    try:
        for fmt in options:
            per_option[fmt.name] = _score_one_option(model, layers, fmt, batches, bar, dtype)
    finally:
        bar.close()
    # Under torchrun each rank scored its share of the samples: the scores are sums, so add them.
    table = torch.tensor(
        [[per_option[fmt.name][layer.name] for fmt in options] for layer in layers],
        dtype=torch.float64,
    )
    table = all_reduce_sum(table)
    return {
        layer.name: {fmt.name: float(table[i, k]) for k, fmt in enumerate(options)}
        for i, layer in enumerate(layers)
    }
