"""`bitplan search`, the Python API and the plan file, on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

import bitplan
from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.formats import parse_format
from bitplan.plans import Plan

SMALL = ["--n-samples", "4", "--seq-len", "32"]


def test_search_writes_plans_front_and_plot(tiny_folder, tmp_path, capsys):
    out = tmp_path / "plans"
    argv = ["search", str(tiny_folder), "--options", "mxfp4,mxfp8", "--avg-bits", "5", "6"]
    assert main([*argv, *SMALL, "--out", str(out), "--ignore-scale-bits"]) == 0
    printed = capsys.readouterr().out
    assert "optimum proven for every budget" in printed
    for budget in (5, 6):
        plan = Plan.load(out / f"plan_bitplan_{budget}.json")
        assert plan.proven_optimal and plan.budget_avg_bits == budget
        assert plan.avg_bits <= budget and plan.avg_bits_without_scales == plan.avg_bits
        assert len(plan.layer_formats) == 14 and set(plan.layer_formats.values()) <= {
            "mxfp4",
            "mxfp8",
        }
    front = json.loads((out / "front.json").read_text())
    assert all(a["avg_bits"] < b["avg_bits"] for a, b in zip(front, front[1:], strict=False))
    assert (out / "bits_per_layer.png").stat().st_size > 5_000
    assert (out / "scores.json").is_file()

    # a baseline recipe, written in the same format
    # (two blocks of equal size: at 6 bits exactly block 0, nearest the embedding, is promoted)
    assert main([*argv[:2], "--options", "mxfp4,mxfp8", "--avg-bits", "6", "--recipe", "tail",
                 "--out", str(out), "--ignore-scale-bits"]) == 0  # fmt: skip
    tail = Plan.load(out / "plan_tail_6.json")
    assert tail.recipe == "tail" and tail.avg_bits == 6
    assert tail.layer_formats["model.layers.0.self_attn.q_proj"] == "mxfp8"
    assert tail.layer_formats["model.layers.1.self_attn.q_proj"] == "mxfp4"


def test_impossible_budget_names_the_range(tiny_folder, capsys):
    code = main(["search", str(tiny_folder), "--options", "mxfp4,mxfp8", "--avg-bits", "3",
                 *SMALL, "--ignore-scale-bits"])  # fmt: skip
    assert code == 2
    assert "4.0000 to 8.0000" in capsys.readouterr().err


def test_pins_are_respected_and_counted(tiny_folder, tmp_path):
    out = tmp_path / "pinned"
    argv = ["search", str(tiny_folder), "--options", "mxfp4,mxfp8", "--avg-bits", "5.5",
            "--pin", "lm_head=mxfp8", "--pin", r"layers\.1\.mlp=mxfp4", *SMALL,
            "--out", str(out), "--ignore-scale-bits"]  # fmt: skip
    assert main(argv) == 0
    plan = Plan.load(out / "plan_bitplan_5p5.json")
    assert plan.include_head and plan.layer_formats["lm_head"] == "mxfp8"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert plan.layer_formats[f"model.layers.1.mlp.{proj}"] == "mxfp4"
    assert plan.avg_bits <= 5.5


def test_pin_that_splits_a_fusion_group_is_refused(tiny_folder, capsys):
    argv = ["search", str(tiny_folder), "--options", "mxfp4,mxfp8", "--avg-bits", "5",
            "--pin", "q_proj=mxfp8", *SMALL]  # fmt: skip
    assert main(argv) == 2
    assert "engine fuses" in capsys.readouterr().err


def test_python_api_and_plan_round_trip(tiny_folder, tmp_path):
    model = bitplan.load(str(tiny_folder))
    scores = bitplan.score(model, ["w2g32", "w4g32"], n_samples=4, seq_len=32, progress=False)
    plans = bitplan.plan(model, scores, [3, 3.5], include_scales=False)
    assert set(plans) == {3, 3.5}
    assert plans[3].predicted_loss >= plans[3.5].predicted_loss
    path = tmp_path / "plan.json"
    plans[3].save(path)
    assert Plan.load(path) == plans[3]
    quantized = bitplan.quantize(model, Plan.load(path))
    with torch.no_grad():
        assert torch.isfinite(quantized(torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(BitplanError, match="not a plan file"):
        (tmp_path / "bad.json").write_text("{")
        Plan.load(tmp_path / "bad.json")


def test_library_search_writes_what_the_command_writes(tiny_folder, tmp_path, capsys):
    argv = ["search", str(tiny_folder), "--options", "mxfp4,mxfp8", "--avg-bits", "5", "6",
            "--dtype", "float32", *SMALL, "--out", str(tmp_path / "cli")]  # fmt: skip
    assert main(argv) == 0
    model = bitplan.load(str(tiny_folder))
    settings = dict(dtype="float32", n_samples=4, seq_len=32, progress=False)
    result = bitplan.search(model, "mxfp4,mxfp8", [5, 6], tmp_path / "lib", **settings)
    assert [p.budget_avg_bits for p in result.plans] == [5, 6] and result.proven_optimal
    assert result.front and result.scores is not None
    assert [p.name for p in result.paths] == ["plan_bitplan_5.json", "plan_bitplan_6.json"]
    for name in ("plan_bitplan_5.json", "plan_bitplan_6.json", "front.json"):
        assert (tmp_path / "lib" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    # a recipe scores nothing, through search or plan
    tail = bitplan.search(model, "mxfp4,mxfp8", 6, recipe="tail", include_scales=False)
    assert tail.scores is None and tail.front == [] and tail.plans[0].recipe == "tail"
    plans = bitplan.plan(model, None, 6, recipe="tail", options="mxfp4,mxfp8", include_scales=False)
    assert plans[6].layer_formats == tail.plans[0].layer_formats
    (uniform,) = bitplan.plan(model, None, recipe="uniform", options="mxfp4,mxfp8").values()
    assert set(uniform.layer_formats.values()) == {"mxfp4"}
    # the solver's plans through bitplan.plan are search's
    assert bitplan.plan(model, result.scores, [5, 6]) == dict(
        zip([5, 6], result.plans, strict=True)
    )
    # importing the module does not shadow the top-level function
    assert callable(bitplan.search)


def test_library_search_checks_before_scoring(tiny_folder, monkeypatch):
    import bitplan.plans.search as search_module
    from bitplan.plans.search import SearchConfig, run_search

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the checks")

    monkeypatch.setattr(search_module, "score", no_scoring)
    model = bitplan.load(str(tiny_folder))
    with pytest.raises(BitplanError, match="4.0000 to 8.0000"):
        run_search(model, SearchConfig("mxfp4,mxfp8", [3], include_scales=False))
    with pytest.raises(BitplanError, match="needs --avg-bits"):
        run_search(model, SearchConfig("mxfp4,mxfp8", recipe="head"))
    with pytest.raises(BitplanError, match="engine fuses"):
        run_search(model, SearchConfig("mxfp4,mxfp8", [5], pins=["q_proj=mxfp8"]))
    with pytest.raises(BitplanError, match="at least two"):
        SearchConfig("mxfp4", [5])
    with pytest.raises(BitplanError, match="unknown recipe"):
        SearchConfig("mxfp4,mxfp8", [5], recipe="middle")


def test_unfused_plans_choose_per_layer(tiny_folder):
    from bitplan.plans import PlanSpace, solve_unfused_plans

    model = bitplan.load(str(tiny_folder))
    scores = bitplan.score(model, ["mxfp4", "mxfp8"], n_samples=4, seq_len=32)
    formats = [parse_format("mxfp4"), parse_format("mxfp8")]
    (fused,) = PlanSpace.build(model.layers, formats, include_scales=False).solve(
        scores, [6], model.identity
    )
    (unfused,) = solve_unfused_plans(
        model.layers, formats, scores, [6], model.identity, include_scales=False
    )
    assert unfused.recipe == "bitplan-unfused" and unfused.proven_optimal
    assert set(unfused.group_formats) == set(unfused.layer_formats) == set(fused.layer_formats)
    # more freedom never predicts a larger loss at the same budget
    assert unfused.predicted_loss <= fused.predicted_loss + 1e-12
    assert unfused.avg_bits <= 6
