"""Block-by-block replay of a decoder: the machinery both scorers share.

A normal forward pass (no gradients) records, for every decoder block, the hidden states that
enter it and the keyword arguments the model passes it (rotary embeddings, attention mask ...).
A block can then be run again alone, with gradients, from what was recorded: so a backward pass
can go block by block, holding one block's activations at a time plus the hidden states at the
block boundaries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from inspect import signature

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.model.layers import find_blocks
from bitplan.model.logits import LOGITS_PER_CHUNK, logits_from_hidden, token_chunks


@dataclass
class BlockInputs:
    """What entered each block, for one micro-batch of token sequences."""

    input_ids: torch.Tensor  # (batch, seq)
    hidden: list[torch.Tensor] = field(default_factory=list)  # hidden[i] enters block i
    kwargs: list[dict] = field(default_factory=list)  # kwargs[i] passed to block i
    final_hidden: torch.Tensor | None = None  # what leaves the last block


def block_output(output) -> torch.Tensor:
    """A decoder block returns a tensor or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, (tuple, list)) else output


def final_norm(model: nn.Module) -> nn.Module:
    """The normalisation between the last block and lm_head."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise BitplanError(
        f"unsupported model {type(model).__name__}: cannot find the final norm before lm_head"
    )


@torch.no_grad()
def record_block_inputs(model: nn.Module, input_ids: torch.Tensor) -> BlockInputs:
    """Run ``model`` once on ``input_ids`` and record every block's input and keyword arguments."""
    _, blocks = find_blocks(model)
    record = BlockInputs(input_ids=input_ids)

    def before_block(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        record.hidden.append(hidden.detach())
        record.kwargs.append(rest)

    def after_last(_module, _args, output):
        record.final_hidden = block_output(output).detach()

    handles = [block.register_forward_pre_hook(before_block, with_kwargs=True) for block in blocks]
    handles.append(blocks[-1].register_forward_hook(after_last))
    try:
        # Only the blocks' inputs are wanted: skip the full-vocabulary logits where the model
        # allows it (they are the largest tensor of the pass).
        extra = (
            {"logits_to_keep": 1} if "logits_to_keep" in signature(model.forward).parameters else {}
        )
        model(input_ids=input_ids, use_cache=False, **extra)
    finally:
        for handle in handles:
            handle.remove()
    if len(record.hidden) != len(blocks) or record.final_hidden is None:
        raise BitplanError("unsupported model: its blocks were not all called exactly once")
    return record


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run one decoder block alone on recorded inputs."""
    if "hidden_states" in block.forward.__code__.co_varnames:
        return block_output(block(hidden_states=hidden, **kwargs))
    return block_output(block(hidden, **kwargs))


def next_token_loss(
    model: nn.Module, final_hidden: torch.Tensor, input_ids: torch.Tensor
) -> torch.Tensor:
    """Summed next-token cross-entropy from the last block's output, all tokens at once (the
    reference ``loss_gradient``'s chunks must agree with)."""
    logits = logits_from_hidden(model, final_norm(model)(final_hidden))
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        input_ids[:, 1:].reshape(-1),
        reduction="sum",
    )


def loss_gradient(
    model: nn.Module,
    final_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    max_logits: int = LOGITS_PER_CHUNK,
    through_final_norm: bool = True,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """Gradient of the summed next-token loss with respect to the last block's output (or, with
    ``through_final_norm=False``, to the final norm's output that the head reads), of the loss
    times ``loss_scale``."""
    batch, length, _ = final_hidden.shape
    # Position t predicts token t + 1; the last position of each sequence predicts nothing.
    targets = torch.full((batch, length), -100, dtype=torch.long, device=input_ids.device)
    targets[:, :-1] = input_ids[:, 1:]
    targets = targets.reshape(-1)

    def loss(part: slice, logits: torch.Tensor) -> torch.Tensor:
        total = nn.functional.cross_entropy(
            logits.float(), targets[part], ignore_index=-100, reduction="sum"
        )
        return total * loss_scale if loss_scale != 1.0 else total

    return _pulled_back(model, final_hidden, loss, max_logits, through_final_norm)


def sampled_label_gradient(
    model: nn.Module,
    final_hidden: torch.Tensor,
    uniforms: torch.Tensor,
    max_logits: int = LOGITS_PER_CHUNK,
) -> torch.Tensor:
    """The gradient of the next-token loss, as ``loss_gradient``, but with every next token drawn
    from the unquantized model's own prediction p instead of read from the text: the token
    whose cumulative probability first reaches that position's number in ``uniforms`` (one in
    [0, 1) per position, shaped (batch * length, 1), in the flattened order of the positions).
    Its outer product at the logits, (p − e_y)(p − e_y)ᵀ, is in expectation
    diag(p) − ppᵀ: the Hessian of KL(p ‖ q) at q = p (the true Fisher, where the text's own
    tokens give the empirical Fisher).

    In place of the loss gradient it makes the fisher estimate one of the KL from the
    unquantized model's predictions, what bitplan measures, instead of the loss on the
    calibration text (which weighs each token by how wrong the model already is). One uniform
    number per token, drawn by inverting p's cumulative sum: no random vector over the whole
    vocabulary. The last position of each sequence gets none, as in the loss."""
    batch, length, _ = final_hidden.shape
    predicts = torch.ones(batch, length, dtype=torch.bool, device=final_hidden.device)
    predicts[:, -1] = False
    predicts = predicts.reshape(-1)

    def loss_on_sampled_labels(part: slice, logits: torch.Tensor) -> torch.Tensor:
        # The vocabulary-wide passes dominate (Gemma: 262,144 logits per token): one log-softmax
        # serves both the sampling and the loss, and the cumulative sum is taken in place.
        log_prob = logits.float().log_softmax(-1)
        with torch.no_grad():
            cumulative = log_prob.detach().exp().cumsum_(-1)
            uniform = uniforms[part].to(logits.device)
            labels = torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).squeeze(-1)
            labels.clamp_(max=logits.shape[-1] - 1)
            del cumulative
        picked = log_prob.gather(-1, labels[:, None]).squeeze(-1)
        return -(picked * predicts[part]).sum()

    return _pulled_back(model, final_hidden, loss_on_sampled_labels, max_logits, True)


def _pulled_back(
    model: nn.Module,
    final_hidden: torch.Tensor,
    objective: Callable[[slice, torch.Tensor], torch.Tensor],
    max_logits: int,
    through_final_norm: bool,
) -> torch.Tensor:
    """The gradient of Σ_chunks ``objective(part, logits)`` with respect to ``final_hidden``.

    The logits over the whole vocabulary (and their gradient) are the largest tensors of the
    whole scoring pass, so they are made a chunk of tokens at a time (``model.logits``): at most
    ``max_logits`` of them exist at once, whatever the vocabulary. The result is the same as
    one pass over everything, the objective being a sum over tokens that each depend on their
    own hidden state alone (the final norm and the head act per token)."""
    batch, length, width = final_hidden.shape
    hidden = final_hidden.detach().reshape(-1, width)
    norm = final_norm(model) if through_final_norm else nn.Identity()
    vocab = model.get_output_embeddings().weight.shape[0]
    grad = torch.zeros_like(hidden)
    for part in token_chunks(hidden.shape[0], vocab, max_logits):
        chunk = hidden[part].requires_grad_(True)
        logits = logits_from_hidden(model, norm(chunk))
        (grad[part],) = torch.autograd.grad(objective(part, logits), chunk)
    return grad.reshape(batch, length, width)


@contextmanager
def linear_weights_in(modules: Iterable[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Hold the weights of the Linear layers inside ``modules`` in ``dtype`` for a while.

    Autocast casts a float32 weight to bfloat16 at every call; a block replayed on several
    batches, or the head applied chunk by chunk, would cast the same weights again each time.
    Casting once gives the same values. The original tensors are put back afterwards."""
    saved = []
    if dtype != torch.float32:
        for module in modules:
            for linear in module.modules():
                if isinstance(linear, nn.Linear) and linear.weight.dtype != dtype:
                    saved.append((linear.weight, linear.weight.data))
                    linear.weight.data = linear.weight.data.to(dtype)
    try:
        yield
    finally:
        for weight, data in saved:
            weight.data = data


def to_device(value, device: torch.device):
    """Move the tensors inside recorded keyword arguments (tuples, dicts) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the first block's inputs are known."""


@torch.no_grad()
def first_block_inputs(model: nn.Module, input_ids: torch.Tensor) -> BlockInputs:
    """Run the model up to its first block only (embeddings, masks, rotary tables) and record
    what enters that block; the blocks themselves may still be on the meta device."""
    _, blocks = find_blocks(model)
    record = BlockInputs(input_ids=input_ids)

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        record.hidden.append(hidden.detach())
        record.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return record


def check_one_attention(model: nn.Module) -> None:
    """Refuse a model whose blocks use different attention types: a streamed pass gives every
    block the first block's keyword arguments (masks, rotary tables)."""
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise BitplanError(
            "streaming does not support models whose blocks use different attention types "
            f"({sorted(set(layer_types))}) yet; drop --stream"
        )


@torch.no_grad()
def record_block_inputs_streaming(model: nn.Module, batches, loader, device, bar=None):
    """Like ``record_block_inputs`` for every batch, loading one block at a time.

    Every block gets the keyword arguments of the first one (``check_one_attention``)."""
    check_one_attention(model)
    records = [first_block_inputs(model, batch) for batch in batches]
    for index in range(len(loader.blocks)):
        block = loader.load(index, device)
        for record in records:
            kwargs = to_device(record.kwargs[0], device)
            out = run_block(block, record.hidden[index].to(device), kwargs).cpu()
            record.hidden.append(out)
            record.kwargs.append(record.kwargs[0])
            if bar is not None:
                bar.update()
        loader.unload(index)
    for record in records:
        record.final_hidden = record.hidden.pop()
        record.kwargs.pop()
    return records
