"""Layer sensitivity scores: for every layer and option, the predicted loss increase.

``score(model, options, tokens)`` runs one of the estimators (``fisher-kl``, the default: a
second-order estimate on layer outputs with next tokens drawn from the model's own predictions;
``fisher``, the same with the text's own next tokens; or the reference's ``delta-loss``) and
caches the result on disk, keyed by the model's weights, the
calibration tokens, the options and the estimator's settings.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bitplan.atomic import file_lock
from bitplan.cache import cache_dir
from bitplan.compute import ComputeDtype, choose_dtype
from bitplan.distributed import is_main, shard, world_size
from bitplan.errors import BitplanError
from bitplan.formats import Format, parse_format
from bitplan.formats.gguf import makes_a_gguf_file
from bitplan.model.loading import LoadedModel
from bitplan.model.streaming import BlockLoader
from bitplan.scoring.delta_loss import delta_loss_scores
from bitplan.scoring.fisher import fisher_scores
from bitplan.scoring.scores import Scores

SCORERS = ("fisher", "fisher-kl", "delta-loss")
#: The scorer every entry point uses unless told otherwise. fisher-kl since 2026-12-06: on a
#: second model (Gemma-3-270M) its plans beat fisher's by up to 22 % in KL, and fisher's are at
#: most 4 % better anywhere but in 3-bit models broken either way (docs/RESULTS.md, "Which
#: fisher").
DEFAULT_SCORER = "fisher-kl"

#: The fisher scorers and what stands for the loss gradient in each (``fisher.GRADIENTS``).
_FISHER_GRADIENT = {"fisher": "loss", "fisher-kl": "kl"}

__all__ = [
    "DEFAULT_SCORER",
    "SCORERS",
    "Scores",
    "delta_loss_scores",
    "fisher_scores",
    "score",
    "tokens_id",
]


def _importance_id(importance: Mapping[str, np.ndarray]) -> str:
    """Identity of an importance matrix (for the score cache)."""
    digest = hashlib.blake2b(digest_size=12)
    for name in sorted(importance):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(importance[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


def tokens_id(tokens: torch.Tensor) -> str:
    """Identity of a calibration token tensor."""
    digest = hashlib.blake2b(tokens.cpu().numpy().tobytes(), digest_size=12)
    return f"{tuple(tokens.shape)}:{digest.hexdigest()}"


def score(
    model: LoadedModel,
    options: Sequence[Format | str],
    tokens: torch.Tensor,
    scorer: str = DEFAULT_SCORER,
    include_head: bool = False,
    batch_size: int = 4,
    cache: bool | Path = True,
    progress: bool = True,
    loader: BlockLoader | None = None,
    device: str = "cpu",
    dtype: str | ComputeDtype = "auto",
    rounding: str = "rtn",
    importance: Mapping[str, np.ndarray] | None = None,
) -> Scores:
    """Score every budgeted layer of ``model`` for every option on calibration ``tokens``.

    ``loader`` (default: a streamed model's own, ``load_streaming``) makes the fisher scorer
    read one block's weights at a time; ``device`` is where blocks are computed (``cuda``, ``cuda:1`` ...); ``dtype`` what the
    passes compute in: ``auto`` (chosen for the device, ``bitplan.compute``), ``float32``,
    ``bfloat16`` or ``float16``. Scores computed in different dtypes are cached apart.
    ``rounding="gptq"`` scores the error GPTQ leaves instead of round-to-nearest's (fisher
    scorers). ``importance`` (layer name -> imatrix, ``importance.collect_importance``) quantizes
    llama.cpp types as ``llama-quantize --imatrix`` does, which IQ2_XS ... need (fisher scorers).
    """
    if scorer not in SCORERS:
        raise BitplanError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    formats = [fmt if isinstance(fmt, Format) else parse_format(fmt) for fmt in options]
    if rounding != "rtn":
        _check_tuned_scoring(rounding, scorer, formats)
    # A GGUF file stores an untied token embedding in a type of its own: planned with the head.
    gguf = makes_a_gguf_file(formats)
    layers = (model.layers.as_gguf_tensors() if gguf else model.layers).selected(include_head)
    untied_embedding = any(layer.role == "embedding" for layer in layers)
    if scorer not in _FISHER_GRADIENT and untied_embedding:
        raise BitplanError(
            f"the {scorer} scorer cannot score a token embedding, which a GGUF plan with the "
            "head includes when it is untied: use --scorer fisher-kl, or drop --quantize-head"
        )
    loader = loader if loader is not None else model.block_loader
    if loader is not None and scorer not in _FISHER_GRADIENT:
        raise BitplanError("streaming works with the fisher scorer only; drop --stream")
    model_id = model.identity
    data_id = tokens_id(tokens)
    names = ",".join(fmt.name for fmt in formats)
    compute = dtype if isinstance(dtype, ComputeDtype) else choose_dtype(device, dtype)
    # v2: llama.cpp types count their activation rounding, and lower-precision ΔY is computed
    # as Q(X)·(Q(W) − W)ᵀ + (Q(X) − X)·Wᵀ (2026-12-06); v3: a tied table's embedding term is
    # quantized with the head's imatrix, as the file is: scores cached before are not reused.
    key = f"v3|{scorer}|{model_id}|{data_id}|{names}|head={include_head}|bs={batch_size}"
    key += f"|{compute.name}" + ("" if rounding == "rtn" else f"|rounding={rounding}")
    # A GGUF file stores a tied output and token embedding as one tensor: its score counts both.
    tied = any(e.tied_to_head for e in model.layers.embeddings)
    tied_embedding = include_head and tied and gguf
    key += "|tied-embedding" if tied_embedding else ""
    key += "|untied-embedding" if untied_embedding else ""
    if importance:
        if scorer not in _FISHER_GRADIENT:
            raise BitplanError(f"an importance matrix works with the fisher scorers, not {scorer}")
        key += f"|imatrix={_importance_id(importance)}"
    run = partial(
        _run_scorer,
        model,
        formats,
        layers,
        tokens,
        scorer,
        batch_size,
        progress,
        loader,
        device,
        rounding,
        tied_embedding,
        importance,
    )
    if not cache:
        return run(compute, key)
    folder = cache / "scores" if isinstance(cache, Path) else cache_dir() / "scores"
    path = folder / (hashlib.blake2b(key.encode(), digest_size=16).hexdigest() + ".json")
    # Runs with the same key wait for the first instead of all scoring it (under torchrun the
    # ranks score together, so they do not lock).
    waiting = f"another bitplan run is computing these scores; waiting for it ({path.name})"
    with file_lock(path.with_suffix(".lock"), enabled=world_size() == 1, waiting=waiting):
        cached = _load_cached(path)
        if cached is not None:
            cached.extra["cache_hit"] = True
            return cached
        result = run(compute, key)
        if is_main():
            result.save(path)
    return result


def _run_scorer(
    model: LoadedModel,
    formats: list[Format],
    layers: list,
    tokens: torch.Tensor,
    scorer: str,
    batch_size: int,
    progress: bool,
    loader: BlockLoader | None,
    device: str,
    rounding: str,
    tied_embedding: bool,
    importance: Mapping[str, np.ndarray] | None,
    compute: ComputeDtype,
    key: str,
) -> Scores:
    start = time.perf_counter()
    local = shard(tokens)  # this rank's samples under torchrun; all of them otherwise
    progress = progress and is_main()
    if scorer in _FISHER_GRADIENT:
        values = fisher_scores(
            model.module,
            layers,
            formats,
            local,
            batch_size,
            progress=progress,
            loader=loader,
            device=device,
            dtype=compute.dtype,
            gradient=_FISHER_GRADIENT[scorer],
            rounding=rounding,
            tied_embedding=tied_embedding,
            importance=importance,
        )
    else:
        if device != "cpu":
            raise BitplanError("the delta-loss scorer runs on the CPU only; drop --device")
        values = delta_loss_scores(
            model.module, layers, formats, local, batch_size, progress=progress, dtype=compute.dtype
        )
    result = Scores(
        scorer=scorer,
        options=[fmt.name for fmt in formats],
        layer_scores=values,
        model_id=model.identity,
        data_id=tokens_id(tokens),
        n_tokens=int(tokens.numel()),
        seconds=time.perf_counter() - start,
        extra={
            "include_head": any(layer.role == "lm_head" for layer in layers),
            "batch_size": batch_size,
            "key": key,
            "dtype": compute.name,
            "dtype_reason": compute.reason,
            "rounding": rounding,
            "tied_embedding": tied_embedding,
        },
    )
    return result


def _check_tuned_scoring(rounding: str, scorer: str, formats: list[Format]) -> None:
    """Refuse, before any work, a tuned-rounding score that cannot be computed."""
    from bitplan.formats.bf16 import BF16Format
    from bitplan.quantization.gptq import check_gptq_format

    if rounding != "gptq":
        raise BitplanError(f"unknown rounding {rounding!r}; choose rtn or gptq")
    if scorer not in _FISHER_GRADIENT:
        raise BitplanError(f"--rounding gptq scores with the fisher scorers only, not {scorer}")
    if world_size() > 1:
        raise BitplanError("--rounding gptq does not run under torchrun yet; run one process")
    for fmt in formats:
        if not isinstance(fmt, BF16Format):
            check_gptq_format(fmt)


def _load_cached(path: Path) -> Scores | None:
    """The scores cached at ``path``; None when there are none. A cache file that cannot be
    read (cut short by a crash, edited, from an incompatible version) is deleted, with a one-line
    warning, so that it is computed again and the cache heals instead of failing every run."""
    if not path.is_file():
        return None
    try:
        return Scores.load(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        print(
            f"bitplan: warning: deleting unreadable cached scores {path} ({err})", file=sys.stderr
        )
        path.unlink(missing_ok=True)
        return None
