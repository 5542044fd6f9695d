"""The default scorer: a second-order (diagonal Fisher) estimate on each layer's output.

For a Linear layer with input X, weight W and gradient G of the summed next-token loss at its
output Y = X Wᵀ, quantizing it with option o changes the output by

    ΔY = Q_act(X) · Q_w(W)ᵀ − X · Wᵀ          (weight error and activation error together)

and the loss by about ½ Σ_tokens,outputs G² ΔY² (the diagonal of the empirical Fisher on the
outputs). One forward and one backward pass of the *unquantized* model give X and G for every
layer; each extra option only costs one matmul per layer (options that quantize activations
add one per distinct rounding of the input, which llama.cpp's types share), so adding options is
cheap.
The passes compute in the dtype chosen for the device (``bitplan.compute``): bfloat16 where the
hardware has it, float32 elsewhere (under autocast; the weights are not converted).

The backward pass goes block by block from recorded block inputs (``replay``): only one block's
activations, plus the hidden states at block boundaries, are in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.compute import autocast, choose_dtype
from bitplan.distributed import all_reduce_sum, rank, world_size
from bitplan.formats import Format
from bitplan.formats.gguf import GGUFFormat, makes_a_gguf_file
from bitplan.model.layers import LayerInfo, find_blocks
from bitplan.model.streaming import BlockLoader
from bitplan.scoring.replay import (
    final_norm,
    linear_weights_in,
    loss_gradient,
    record_block_inputs,
    record_block_inputs_streaming,
    run_block,
    sampled_label_gradient,
    to_device,
)
from bitplan.scoring.scores import fill_unrouted_experts

#: How ΔY is weighed: "diag" ½ Σ G² ΔY² (the default); "token" ½ Σ_t (G_t · ΔY_t)²; "split"
#: the weight error on the output's diagonal and the input's error on the input's diagonal,
#: ½ Σ G² (X·ΔWᵀ)² + ½ Σ (G·Q(W))² ΔX² (an input error spreads over every output, so its
#: output errors are not independent: the diagonal at the input is where they are).
FORMS = ("diag", "token", "split")

#: What stands for the loss's gradient at the logits: "loss" the gradient of the calibration
#: text's next-token loss (the empirical Fisher, the default); "kl" the same loss with each next
#: token drawn from the unquantized model's prediction (``replay.sampled_label_gradient``, the
#: true Fisher), which makes the estimate one of KL(unquantized ‖ quantized), what bitplan
#: measures.
GRADIENTS = ("loss", "kl")


class _OutputErrorMeter:
    """Hooks on a set of Linear layers that accumulate ½ Σ G² ΔY² for every option."""

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        options: Sequence[Format],
        form: str,
        dtype: torch.dtype = torch.float32,
        tuned: dict[str, dict[int, torch.Tensor]] | None = None,
        importance: Mapping[str, np.ndarray] | None = None,
    ):
        """``tuned``: layer name -> option index -> its weight as tuned rounding (GPTQ) leaves
        it, quantize-dequantized; the other options are rounded to nearest. ``importance``:
        layer name -> imatrix, with which llama.cpp types are quantized (as the export will)."""
        self.options = list(options)
        self.form = form
        self.dtype = dtype
        self.totals = {name: [0.0] * len(self.options) for name in modules}
        self.calls = dict.fromkeys(modules, 0)  # an MoE expert may see no token at all
        # Quantize each weight once per option, for the whole block's lifetime, in the dtype the
        # output error is computed in (see _output_errors for the three ways).
        self.direct = dtype == torch.float32 and form != "split"
        self.qweights: dict[str, dict[int, torch.Tensor]] = {}  # Q(W): direct, and "split"
        self.weight_errors: dict[str, dict[int, torch.Tensor]] = {}  # Q(W) − W: the others
        self.weights: dict[str, torch.Tensor] = {}  # W, for (Q(X) − X)·Wᵀ in lower precision
        rounds_inputs = any(fmt.quantizes_activations for fmt in self.options)
        with torch.no_grad():
            for name, m in modules.items():
                weight = m.weight.float()
                qweights, errors = {}, {}
                for k, fmt in enumerate(self.options):
                    quantized = (tuned or {}).get(name, {}).get(k)
                    if quantized is None:
                        quantized = _quantized(fmt, m.weight, (importance or {}).get(name))
                    if not fmt.quantizes_activations or not self.direct:
                        errors[k] = (quantized - weight).to(dtype)
                    if fmt.quantizes_activations and (self.direct or form == "split"):
                        qweights[k] = quantized.to(dtype)
                if not self.direct and form != "split" and rounds_inputs:
                    self.weights[name] = m.weight.to(dtype)
                self.qweights[name], self.weight_errors[name] = qweights, errors
        self.handles = [
            module.register_forward_hook(self._make_hook(name)) for name, module in modules.items()
        ]
        self._last_input: tuple[torch.Tensor, _SharedInput] | None = None

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Linear, inputs, output):
            x = self._shared_input(inputs[0])
            y = None  # the direct form needs Y (without its bias)
            if self.direct and output.dtype == torch.float32:
                y = output.detach()
                if module.bias is not None:
                    y = y - module.bias

            def on_grad(grad: torch.Tensor) -> None:
                self._accumulate(name, x, grad.detach(), y)

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    def _shared_input(self, x: torch.Tensor) -> _SharedInput:
        """Layers fed the very same tensor (q/k/v, gate/up) share its quantization errors."""
        if self._last_input is None or self._last_input[0] is not x:
            self._last_input = (x, _SharedInput(x.detach(), self.options, self.dtype))
        shared = self._last_input[1]
        shared.readers += 1
        return shared

    @torch.no_grad()
    def _accumulate(
        self, name: str, x: _SharedInput, grad: torch.Tensor, y: torch.Tensor | None
    ) -> None:
        grad = grad.reshape(-1, grad.shape[-1]).float()
        self.calls[name] += 1
        for k, delta in self._output_errors(name, x, y):
            product = grad * delta  # float32
            if self.form == "token":  # ½ Σ_t (G_t · ΔY_t)², each token's output as a whole
                value = 0.5 * product.sum(dim=-1).square().sum()
            else:  # ½ Σ G² ΔY² = ½ |G ⊙ ΔY|²
                value = 0.5 * torch.dot(product.view(-1), product.view(-1))
            if self.form == "split" and self.options[k].quantizes_activations:
                # The input's error on the input's diagonal: ½ Σ G_X² ΔX², G_X = G·Q(W).
                grad_in = grad.to(self.dtype) @ self.qweights[name][k]
                product = grad_in.float() * x.error(k)
                value = value + 0.5 * torch.dot(product.view(-1), product.view(-1))
            self.totals[name][k] += float(value)
        x.done()

    def _output_errors(
        self, name: str, x: _SharedInput, y: torch.Tensor | None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(option, ΔY = Q(X)·Q(W)ᵀ − X·Wᵀ) for every option, as [tokens, outputs] rows.

        Weight-only options (and the weight half of "split"): ΔY = X·(Q(W) − W)ᵀ. Options that
        quantize activations, in float32: Q(X)·Q(W)ᵀ − Y, one matmul, exact enough at 24 bits.
        In lower precision the difference of two rounded outputs would not be, so
        ΔY = Q(X)·(Q(W) − W)ᵀ + (Q(X) − X)·Wᵀ: products of small differences, which stay
        accurate. The second term depends on the option only through how it rounds X, so the
        options that round X alike (llama.cpp's types: Q8_0 or Q8_K blocks) share one matmul."""
        plain = [k for k in range(len(self.options)) if not self._rounds_input(k)]
        for k in plain:
            yield k, nn.functional.linear(x.rows(), self.weight_errors[name][k])
        rounding = [k for k in range(len(self.options)) if self._rounds_input(k)]
        if self.direct:
            for k in rounding:
                delta = nn.functional.linear(x.quantized(k), self.qweights[name][k])
                yield k, delta.sub_(y.reshape(delta.shape))
            return
        for group in x.alike(rounding):
            shared = nn.functional.linear(x.error(group[0]).to(self.dtype), self.weights[name])
            shared = shared.float()
            for k in group:
                delta = nn.functional.linear(x.quantized(k), self.weight_errors[name][k])
                yield k, delta.float().add_(shared)

    def _rounds_input(self, k: int) -> bool:
        """Whether option ``k``'s ΔY has an input part here ("split" weighs that part apart)."""
        return self.options[k].quantizes_activations and self.form != "split"

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._last_input = None


def _quantized(fmt: Format, weight: torch.Tensor, importance: np.ndarray | None) -> torch.Tensor:
    """``weight`` quantize-dequantized in ``fmt``, in float32; a llama.cpp type with the
    layer's imatrix when there is one (IQ2_XS ... need it)."""
    if importance is not None and isinstance(fmt, GGUFFormat):
        return fmt.quantize_weight(weight, importance=importance).float()
    return fmt.quantize_weight(weight).float()


class _SharedInput:
    """A layer input as rows in the compute dtype, and its rounding Q(X) under each option that
    quantizes activations: made on first use (in the backward pass), once for all options that
    round it alike, and dropped once every layer reading this input has used them."""

    def __init__(self, x: torch.Tensor, options: Sequence[Format], dtype: torch.dtype):
        self.x = x
        self.options = options
        self.dtype = dtype
        self.readers = 0
        self._rows: torch.Tensor | None = None
        self._float: torch.Tensor | None = None  # X as float32 rows, what every Q(X) rounds
        self._same: dict[int, int] = {}  # option -> the first option that rounds X alike
        self._rounded: dict[int, torch.Tensor] = {}  # that option -> Q(X), float32
        self._quantized: dict[int, torch.Tensor] = {}  # ... Q(X), compute dtype
        self._errors: dict[int, torch.Tensor] = {}  # ... Q(X) − X, float32

    def rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = self.x.reshape(-1, self.x.shape[-1]).to(self.dtype)
        return self._rows

    def _float_rows(self) -> torch.Tensor:
        if self._float is None:
            self._float = self.x.reshape(-1, self.x.shape[-1]).float()
        return self._float

    @torch.no_grad()
    def _first_alike(self, k: int) -> int:
        """The first option that rounds X exactly as option ``k`` does (``k`` itself if none)."""
        if k not in self._same:
            rounded = self.options[k].quantize_activation(self._float_rows())
            alike = (j for j, other in self._rounded.items() if torch.equal(other, rounded))
            self._same[k] = next(alike, k)
            if self._same[k] == k:
                self._rounded[k] = rounded
        return self._same[k]

    def alike(self, options: Sequence[int]) -> list[list[int]]:
        """``options`` grouped by how they round X: options in one group give equal Q(X)."""
        groups: dict[int, list[int]] = {}
        for k in options:
            groups.setdefault(self._first_alike(k), []).append(k)
        return list(groups.values())

    @torch.no_grad()
    def quantized(self, k: int) -> torch.Tensor:
        """Q(X) under option ``k``, in the compute dtype."""
        j = self._first_alike(k)
        if j not in self._quantized:
            self._quantized[j] = self._rounded[j].to(self.dtype)
        return self._quantized[j]

    @torch.no_grad()
    def error(self, k: int) -> torch.Tensor:
        """Q(X) − X under option ``k``, float32."""
        j = self._first_alike(k)
        if j not in self._errors:
            self._errors[j] = self._rounded[j] - self._float_rows()
        return self._errors[j]

    def done(self) -> None:
        self.readers -= 1
        if self.readers <= 0:
            self._rows = None
            self._float = None
            self._same.clear()
            self._rounded.clear()
            self._quantized.clear()
            self._errors.clear()


def fisher_scores(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    options: Sequence[Format],
    tokens: torch.Tensor,
    batch_size: int = 4,
    form: str = "diag",
    progress: bool = True,
    loader: BlockLoader | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    gradient: str = "loss",
    seed: int = 0,
    rounding: str = "rtn",
    tied_embedding: bool = False,
    importance: Mapping[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Layer name -> option name -> predicted increase of the mean per-token loss (or, with
    ``gradient="kl"``, of the mean per-token KL from the unquantized model: ``GRADIENTS``; its
    sampled tokens depend on ``seed`` and each sequence's place in the calibration set only
    (:func:`label_uniforms`), so a run is repeatable, under torchrun too).

    ``tokens`` is a (n_samples, seq_len) LongTensor of calibration text (this rank's share when
    run under torchrun); ``layers`` the layers to score (decoder Linear layers, plus lm_head if
    it is to be quantized). With a ``loader`` (streaming), each block's weights are read when it
    is worked on and dropped after; ``device`` is where each block is computed (recorded
    activations stay on the CPU). ``dtype`` is what the passes compute in (autocast; the
    weights are not converted); None chooses for ``device`` (``bitplan.compute.choose_dtype``).
    With ``rounding="gptq"`` each decoder layer's options are GPTQ-rounded first (its Hessian
    from one extra forward run of its block on the recorded inputs, shared by all options of
    the same input), so that ΔY is the error GPTQ leaves; lm_head stays rounded to nearest, as
    ``bitplan.quantization.sequential.gptq_model`` leaves it.
    ``tied_embedding``: lm_head's weight is also the input embedding, stored once and quantized
    once (a GGUF file's ``token_embd``), so lm_head's score also counts the error the quantized
    embedding feeds the first block. ``importance`` (layer name -> imatrix,
    ``bitplan.scoring.importance.collect_importance``) quantizes llama.cpp types as
    ``llama-quantize --imatrix`` does.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, not {gradient!r}")
    device = torch.device(device)
    if dtype is None:
        dtype = choose_dtype(device).dtype
    modules = dict(model.named_modules())
    wanted = {layer.name for layer in layers}
    blocks_path, blocks = find_blocks(model)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in modules.items() if m is head), None)
    embed = model.get_input_embeddings()
    totals: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved_flags:
        p.requires_grad_(False)  # gradients flow through activations only
    batches = list(torch.split(tokens, batch_size))
    steps = len(batches) * (2 * len(blocks) + 1) if loader else len(batches) * (len(blocks) + 2)
    name = "fisher" if gradient == "loss" else "fisher-kl"  # the scorer's name (scoring.SCORERS)
    bar = tqdm(total=steps, desc=f"scoring ({name})", disable=not progress)
    compute = autocast(device, dtype)
    try:
        if loader is None:
            records = []
            for batch in batches:
                with compute:
                    records.append(record_block_inputs(model, batch))
                bar.update()
        else:
            with compute:
                records = record_block_inputs_streaming(model, batches, loader, device, bar)
        # Gradient at the last block's output (and lm_head's scores if it is being scored).
        tail = [final_norm(model), head]
        for module in tail:
            module.to(device)
        grads = []
        meter = None
        if head_name in wanted:
            meter = _OutputErrorMeter({head_name: head}, options, form, dtype, None, importance)
        if gradient == "kl":
            n_sequences = int(all_reduce_sum(torch.tensor([len(tokens)])).item())
            here = range(rank(), n_sequences, world_size())  # this rank's rows (``shard``)
            drawn = label_uniforms(seed, here, n_sequences, batch_size, tokens.shape[1])
            uniforms = torch.split(drawn, batch_size * tokens.shape[1])  # one per batch
        with linear_weights_in(tail, dtype):  # cast once for all batches
            for k, record in enumerate(records):
                hidden = record.final_hidden.to(device)
                with compute:
                    if gradient == "kl":
                        grad = sampled_label_gradient(model, hidden, uniforms[k])
                    else:
                        grad = loss_gradient(model, hidden, record.input_ids.to(device))
                grads.append(grad.cpu())
                record.final_hidden = None
                bar.update()
        for module in tail:
            module.to("cpu")
        if meter is not None:
            meter.close()
            totals.update(meter.totals)
            calls.update(meter.calls)
        # Blocks from the last to the first, each run forward and backward on its recorded input.
        for index in reversed(range(len(blocks))):
            block = loader.load(index, device) if loader else blocks[index].to(device)
            prefix = f"{blocks_path}.{index}."
            block_modules = {n: modules[n] for n in wanted if n.startswith(prefix)}
            tuned = None
            if rounding == "gptq":
                inputs = [
                    (record.hidden[index].to(device), to_device(record.kwargs[index], device))
                    for record in records
                ]
                with compute:
                    tuned = _gptq_weights(block, block_modules, prefix, options, inputs)
            meter = _OutputErrorMeter(block_modules, options, form, dtype, tuned, importance)
            with linear_weights_in([block], dtype):  # after the meter read the weights
                for k, record in enumerate(records):
                    hidden = record.hidden[index].to(device).requires_grad_(True)
                    with compute:
                        out = run_block(block, hidden, to_device(record.kwargs[index], device))
                        out.backward(grads[k].to(device).to(out.dtype))
                    grads[k] = hidden.grad.cpu()
                    record.hidden[index] = None  # free what is no longer needed
                    bar.update()
            meter.close()
            totals.update(meter.totals)
            calls.update(meter.calls)
            if loader:
                loader.unload(index)
            else:
                block.to("cpu")
        # grads now: at the first block's input, where a quantized embedding's error enters.
        ids = [record.input_ids for record in records]
        if tied_embedding and head_name in wanted:
            head_importance = (importance or {}).get(head_name)
            fed = _embedding_errors(embed, options, ids, grads, form, head_importance)
            totals[head_name] = [a + b for a, b in zip(totals[head_name], fed, strict=True)]
        for layer in layers:
            if layer.role == "embedding":  # untied, in a GGUF plan: a choice of its own
                totals[layer.name] = _embedding_errors(embed, options, ids, grads, form)
                calls[layer.name] = len(records)
    finally:
        bar.close()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    return normalised_totals(totals, calls, options, tokens)


def label_uniforms(
    seed: int, sequences: Sequence[int], n_sequences: int, batch_size: int, length: int
) -> torch.Tensor:
    """The uniform numbers that draw the sampled next tokens (``sampled_label_gradient``) of the
    calibration ``sequences`` (their indices among all ``n_sequences``), (len(sequences) *
    length, 1). Every batch of ``batch_size`` consecutive sequences draws its numbers from its
    own generator, seeded by ``seed`` and the batch: a sequence gets the same numbers whichever
    torchrun rank scores it, and one process gets the numbers it always had."""
    by_batch: dict[int, torch.Tensor] = {}
    drawn = []
    for sequence in sequences:
        batch, row = divmod(sequence, batch_size)
        if batch not in by_batch:
            rows = min(batch_size, n_sequences - batch * batch_size)
            generator = torch.Generator().manual_seed((seed << 20) + batch)
            by_batch[batch] = torch.rand(rows * length, 1, generator=generator)
        drawn.append(by_batch[batch][row * length : (row + 1) * length])
    return torch.cat(drawn) if drawn else torch.zeros(0, 1)


@torch.no_grad()
def _embedding_errors(
    embedding: nn.Module,
    options: Sequence[Format],
    input_ids: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    form: str,
    importance: np.ndarray | None = None,
) -> list[float]:
    """For each option, ½ Σ G² ΔE² over the calibration tokens: ΔE is what the embedding module
    outputs with its table quantized minus what it outputs now (its own scaling included, as
    Gemma's √hidden), G the loss's gradient there (the first block's input). ``importance`` is
    the imatrix the table is quantized with (a tied head's); an option that needs one when
    there is none scores nan (llama-quantize refuses it: ``plans.build.storable_options``).

    Where the options are llama.cpp types, which round every row on its own, only the rows of
    the tokens used are quantized: a few thousand of Gemma-3-270M's 262,144, whose whole table
    took minutes per type on top of the output error's own quantization of it."""
    weight = embedding.weight
    plain = [embedding(ids).float() for ids in input_ids]
    used = torch.unique(torch.cat([ids.reshape(-1) for ids in input_ids]))
    rows = used if makes_a_gguf_file(options) else slice(None)
    table = weight.detach().clone()  # its ``rows`` are overwritten by each option in turn
    quantized = {"weight": table}
    errors = []
    for fmt in options:
        if importance is None and fmt.requires_importance_for(weight.shape[1]):
            errors.append(math.nan)
            continue
        table[rows] = _quantized(fmt, weight[rows], importance).to(weight.dtype)
        total = 0.0
        for ids, grad, before in zip(input_ids, grads, plain, strict=True):
            after = torch.func.functional_call(embedding, quantized, (ids,)).float()
            product = grad.float() * (after - before)
            if form == "token":
                total += 0.5 * float(product.sum(dim=-1).square().sum())
            else:  # an embedding has no activation error: "split" is "diag"
                total += 0.5 * float(torch.dot(product.view(-1), product.view(-1)))
        errors.append(total)
    return errors


def _gptq_weights(
    block: nn.Module,
    modules: dict[str, nn.Linear],
    prefix: str,
    options: Sequence[Format],
    inputs: list[tuple[torch.Tensor, dict]],
) -> dict[str, dict[int, torch.Tensor]]:
    """Layer name -> option index -> the layer's weight GPTQ-rounded to that option (float32,
    dequantized), with Hessians from one forward run of ``block`` on ``inputs``. Options GPTQ
    does not round (bf16) are left out: they are rounded to nearest."""
    # Imported here: bitplan.quantization.sequential imports this package's replay module.
    from bitplan.formats.bf16 import BF16Format
    from bitplan.quantization.gptq import gptq_round
    from bitplan.quantization.sequential import collect_hessians, input_view

    tuned_options = {k: fmt for k, fmt in enumerate(options) if not isinstance(fmt, BF16Format)}
    views = list(dict.fromkeys(input_view(fmt) for fmt in tuned_options.values()))
    local = {name[len(prefix) :]: module for name, module in modules.items()}
    hessians = collect_hessians(block, local, dict.fromkeys(local, views), inputs)
    tuned: dict[str, dict[int, torch.Tensor]] = {}
    for name, module in local.items():
        weight = module.weight.detach()
        tuned[prefix + name] = {
            k: gptq_round(weight, hessians[name][views.index(input_view(fmt))].matrix, fmt).values()
            for k, fmt in tuned_options.items()
        }
    return tuned


def normalised_totals(
    totals: dict[str, list[float]],
    calls: dict[str, int],
    options: Sequence[Format],
    tokens: torch.Tensor,
) -> dict[str, dict[str, float]]:
    """Sum the per-layer totals over ranks (when distributed), divide by the number of predicted
    tokens of the whole calibration set (so each score is per token), and give MoE experts that
    no calibration token reached their block's mean."""
    names = sorted(totals)
    summed = all_reduce_sum(torch.tensor([totals[n] for n in names], dtype=torch.float64))
    seen = all_reduce_sum(torch.tensor([calls[n] for n in names], dtype=torch.float64))
    n_predicted = all_reduce_sum(
        torch.tensor([tokens.shape[0] * (tokens.shape[1] - 1)], dtype=torch.float64)
    )
    values = {
        name: {fmt.name: float(summed[i, k] / n_predicted[0]) for k, fmt in enumerate(options)}
        for i, name in enumerate(names)
    }
    unseen = {name for i, name in enumerate(names) if seen[i] == 0}
    return fill_unrouted_experts(values, unseen)
