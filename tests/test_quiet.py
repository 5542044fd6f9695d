"""Other libraries' bars, log lines and warnings stay out of bitplan's output unless --verbose."""

from __future__ import annotations

import importlib
import logging
import warnings

import pytest
from transformers.utils import logging as transformers_logging

from bitplan.cli import main
from bitplan.quiet import third_party_quiet


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_quiet_silences_others_and_restores_everything():
    lm_eval_logger = logging.getLogger("lm_eval")
    before = lm_eval_logger.level
    assert transformers_logging.is_progress_bar_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with third_party_quiet():
            assert not transformers_logging.is_progress_bar_enabled()
            assert lm_eval_logger.getEffectiveLevel() == logging.ERROR
            for name in ("lm_eval.api.task", "transformers.modeling_gguf_pytorch_utils"):
                assert importlib.import_module(name).tqdm([]).disable  # bars with no switch
            warnings.warn_explicit("theirs", UserWarning, "x.py", 1, module="transformers.x")
            warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="bitplan.scoring")
        warnings.warn_explicit("theirs again", UserWarning, "x.py", 2, module="transformers.x")
    assert [str(w.message) for w in caught] == ["ours", "theirs again"]
    assert transformers_logging.is_progress_bar_enabled() and lm_eval_logger.level == before
    assert not importlib.import_module("lm_eval.api.task").tqdm([]).disable


@pytest.mark.parametrize("verbose", [False, True])
def test_eval_shows_lm_evals_bars_only_when_verbose(
    verbose, offline, tiny_folder, tmp_path, monkeypatch, capfd
):
    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's git call would complain
    argv = ["eval", str(tiny_folder), "--tasks", "winogrande", "--limit", "2", "--dtype", "float32"]
    assert main(argv + (["--verbose"] if verbose else [])) == 0
    out, err = capfd.readouterr()
    assert "winogrande" in out and "average (acc)" in out
    assert ("Tokenizing inputs" in err) == verbose  # lm-eval's own bar
    assert "not a git repository" not in err or verbose
    assert transformers_logging.is_progress_bar_enabled()  # as before the command
