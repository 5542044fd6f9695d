"""Other libraries' output off while bitplan works: their progress bars, log lines and warnings.

transformers draws "Loading weights" bars on every load, datasets a bar per split it prepares,
lm-eval a "building contexts" bar per task (61 for MMLU) and several log lines each, and all of
them warn about things a bitplan user cannot change. That buries bitplan's own bars and one-line
messages, so the command line runs every command inside :func:`third_party_quiet` unless
``--verbose``; ``bitplan.evaluate`` does the same around lm-eval unless ``quiet=False``.
bitplan's own bars and warnings are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import subprocess
import warnings
from collections.abc import Callable, Iterator

#: Loggers of the libraries bitplan drives, kept to errors.
QUIET_LOGGERS = ("lm_eval", "lm-eval", "transformers", "datasets", "huggingface_hub", "accelerate")


@contextlib.contextmanager
def third_party_quiet(enabled: bool = True) -> Iterator[None]:
    """Within the block, other libraries log errors only, draw no bars and warn nothing;
    everything is as before afterwards."""
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(_loggers_at_error())
        stack.enter_context(_no_third_party_warnings())
        stack.enter_context(_no_hub_bars())
        stack.enter_context(_no_transformers_bars())
        stack.enter_context(_no_datasets_bars())
        stack.enter_context(_no_switchless_bars())
        stack.enter_context(_no_git_complaint())
        yield


@contextlib.contextmanager
def _loggers_at_error() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _no_third_party_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"bitplan(\.|$)")  # bitplan's own stay
        yield


@contextlib.contextmanager
def _bars_off(
    are_disabled: Callable[[], bool], disable: Callable[[], None], enable: Callable[[], None]
) -> Iterator[None]:
    """A library's own progress-bar switch off, and back as it was."""
    was_disabled = are_disabled()
    disable()
    try:
        yield
    finally:
        if not was_disabled:
            enable()


def _no_hub_bars() -> contextlib.AbstractContextManager[None]:
    from huggingface_hub import utils

    return _bars_off(
        utils.are_progress_bars_disabled, utils.disable_progress_bars, utils.enable_progress_bars
    )


def _no_transformers_bars() -> contextlib.AbstractContextManager[None]:
    from transformers.utils import logging as transformers_logging

    return _bars_off(
        lambda: not transformers_logging.is_progress_bar_enabled(),
        transformers_logging.disable_progress_bar,
        transformers_logging.enable_progress_bar,
    )


def _no_datasets_bars() -> contextlib.AbstractContextManager[None]:
    try:
        from datasets import utils
    except ImportError:  # datasets comes with lm-eval; without it there is nothing to quiet
        return contextlib.nullcontext()
    return _bars_off(
        utils.are_progress_bars_disabled, utils.disable_progress_bars, utils.enable_progress_bars
    )


#: Modules that draw a bar with no switch to turn it off: lm-eval's per-task "building contexts"
#: bar, transformers' "Converting and de-quantizing GGUF tensors" (bitplan says it converts).
_SWITCHLESS_BARS = ("lm_eval.api.task", "transformers.modeling_gguf_pytorch_utils")


@contextlib.contextmanager
def _no_switchless_bars() -> Iterator[None]:
    """Their module-level ``tqdm`` replaced by a disabled one while quiet."""
    modules = []
    for name in _SWITCHLESS_BARS:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:  # an optional library: nothing to quiet
            continue
    bars = [module.tqdm for module in modules]
    for module, bar in zip(modules, bars, strict=True):
        module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        for module, bar in zip(modules, bars, strict=True):
            module.tqdm = bar


@contextlib.contextmanager
def _no_git_complaint() -> Iterator[None]:
    """lm-eval asks git for the current folder's commit, and git prints "fatal: not a git
    repository" outside one: the question is asked silently instead."""
    try:
        import lm_eval.evaluator as evaluator_module
    except ImportError:
        yield
        return
    git_hash = evaluator_module.get_git_commit_hash
    evaluator_module.get_git_commit_hash = _git_commit_hash_silently
    try:
        yield
    finally:
        evaluator_module.get_git_commit_hash = git_hash


def _git_commit_hash_silently() -> str | None:
    """The current folder's git commit, as lm-eval records it, without git's complaints."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always"], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() or None
