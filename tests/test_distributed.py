"""Two processes through torchrun (gloo on CPU) give the plan and scores of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARGS = ["--options", "mxfp4,mxfp8", "--avg-bits", "5", "--n-samples", "4", "--seq-len", "32"]


def _search(cmd: list[str], out) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        cmd + ["--out", str(out), "--no-cache"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_two_ranks_match_one_process(tmp_path, tiny_model, tiny_tokenizer):
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    search = ["-m", "bitplan", "search", str(folder), *ARGS]
    _search([sys.executable, *search], tmp_path / "one")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    _search([*torchrun, *search], tmp_path / "two")

    plan_one = json.loads((tmp_path / "one" / "plan_bitplan_5.json").read_text())
    plan_two = json.loads((tmp_path / "two" / "plan_bitplan_5.json").read_text())
    assert plan_two["layer_formats"] == plan_one["layer_formats"]
    scores_one = json.loads((tmp_path / "one" / "scores.json").read_text())["layer_scores"]
    scores_two = json.loads((tmp_path / "two" / "scores.json").read_text())["layer_scores"]
    assert scores_one.keys() == scores_two.keys()
    # Only the order of floating-point additions differs between the two runs.
    for layer, by_option in scores_one.items():
        for option, value in by_option.items():
            assert scores_two[layer][option] == pytest.approx(value, rel=1e-5), (layer, option)
