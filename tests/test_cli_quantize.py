"""`bitplan quantize` writes an export that `load_model` (and so `bitplan eval`) reads back."""

from __future__ import annotations

import json

import torch

import bitplan
from bitplan.cli import main
from bitplan.model import load_model
from bitplan.plans import Plan
from bitplan.quantization import apply_plan


def test_quantize_packed_then_load_matches_fake(tmp_path, tiny_folder):
    folder = tiny_folder
    plans = tmp_path / "plans"
    assert main(["search", str(folder), "--options", "w2g32,w4g32", "--avg-bits", "3",
                 "--n-samples", "4", "--seq-len", "32", "--out", str(plans)]) == 0  # fmt: skip
    plan_path = plans / "plan_bitplan_3.json"
    out = tmp_path / "packed"
    argv = ["quantize", str(folder), "--plan", str(plan_path), "--format", "packed"]
    assert main([*argv, "--out", str(out)]) == 0
    assert main([*argv, "--out", str(out)]) == 2  # exists: needs --force
    assert main([*argv, "--out", str(out), "--force"]) == 0
    reloaded = load_model(out)
    fake = apply_plan(load_model(folder).module, Plan.load(plan_path))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(reloaded.module(ids).logits, fake(ids).logits, atol=1e-5)


def test_search_quantize_chains_search_and_export(tmp_path, tiny_folder, capsys):
    folder = tiny_folder
    search = ["search", str(folder), "--options", "w2g32,w4g32", "--n-samples", "4",
              "--seq-len", "32", "--no-cache", "--out", str(tmp_path / "plans")]  # fmt: skip
    out = tmp_path / "chained"
    # Two budgets cannot make one model: refused before any scoring, nothing written.
    assert main([*search, "--avg-bits", "3", "4", "--quantize", str(out), "--format", "fake"]) == 2
    assert "single --avg-bits" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "plans").exists()
    assert main([*search, "--avg-bits", "3", "--quantize", str(out)]) == 2  # no --format
    assert main([*search, "--avg-bits", "3", "--quantize", str(out), "--format", "packed"]) == 0
    reloaded = load_model(out)
    plan = Plan.load(tmp_path / "plans" / "plan_bitplan_3.json")
    fake = apply_plan(load_model(folder).module, plan)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(reloaded.module(ids).logits, fake(ids).logits, atol=1e-5)


def test_search_and_quantize_with_tuned_rounding(tmp_path, tiny_folder, capsys):
    """A search for tuned rounding records it and scores as GPTQ does (the same cached scores);
    quantize tunes and the export reloads to the library's tuned model; tuning refuses a GGUF
    type before loading the model."""
    folder, plans = tiny_folder, tmp_path / "plans"
    calibration = ["--n-samples", "4", "--seq-len", "32"]
    search = ["search", str(folder), "--options", "w2g32,w4g32", "--avg-bits", "3", *calibration]
    assert main([*search, "--rounding", "gptq", "--out", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    assert main([*search, "--rounding", "tuned", "--out", str(plans)]) == 0
    assert "(from cache)" in capsys.readouterr().out
    plan_path = plans / "plan_bitplan_3.json"
    plan = Plan.load(plan_path)
    assert plan.rounding == "tuned"
    assert plan.layer_formats == Plan.load(tmp_path / "g" / "plan_bitplan_3.json").layer_formats
    out = tmp_path / "packed"
    argv = ["quantize", str(folder), "--plan", str(plan_path), *calibration]
    assert main([*argv, "--format", "packed", "--out", str(out)]) == 0
    model = load_model(folder)
    tuned = bitplan.quantize(model, plan, n_samples=4, seq_len=32, progress=False)
    gptq = bitplan.quantize(model, plan, "gptq", n_samples=4, seq_len=32, progress=False)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(load_model(out).module(ids).logits, tuned(ids).logits)
        assert not torch.equal(tuned(ids).logits, gptq(ids).logits)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["rounding"] == (
        "tuned"
    )
    gguf = ["search", str(folder), "--options", "q4_k,q8_0", "--avg-bits", "5", "--rounding"]
    assert main([*gguf, "tuned", "--out", str(tmp_path / "gguf")]) == 2
    assert "GPTQ rounding is not available for q4_k" in capsys.readouterr().err
    assert not (tmp_path / "gguf").exists()


def test_search_and_quantize_with_gptq_rounding(tmp_path, tiny_folder, capsys):
    """A GPTQ-aware search records its rounding; quantize applies it by default and the export
    reloads to the GPTQ model of the same calibration tokens; what GPTQ cannot do is refused
    before any loading."""
    folder, plans = tiny_folder, tmp_path / "plans"
    calibration = ["--n-samples", "4", "--seq-len", "32"]
    search = ["search", str(folder), "--options", "w2g32,w4g32", "--avg-bits", "3", *calibration]
    assert main([*search, "--rounding", "gptq", "--out", str(plans)]) == 0
    assert "rounding=gptq" not in capsys.readouterr().err
    plan_path = plans / "plan_bitplan_3.json"
    plan = Plan.load(plan_path)
    assert plan.rounding == "gptq"
    out = tmp_path / "packed"
    argv = ["quantize", str(folder), "--plan", str(plan_path), *calibration]
    assert main([*argv, "--format", "packed", "--out", str(out)]) == 0
    model = load_model(folder)
    tuned = bitplan.quantize(model, plan, n_samples=4, seq_len=32, progress=False)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(load_model(out).module(ids).logits, tuned(ids).logits)
        assert not torch.equal(tuned(ids).logits, apply_plan(model.module, plan)(ids).logits)
    for refused, message in [
        (["--format", "gguf", "--out", str(tmp_path / "m.gguf")], "cannot store gptq-rounded"),
        (["--format", "packed", "--out", str(tmp_path / "c"), "--calib", "absent.txt"], "absent"),
    ]:
        assert main([*argv, *refused]) == 2
        assert message in capsys.readouterr().err
    assert (
        main([*argv, "--format", "packed", "--out", str(tmp_path / "r"), "--rounding", "rtn"]) == 0
    )
    with torch.no_grad():
        rtn = apply_plan(model.module, plan)(ids).logits
        assert torch.allclose(load_model(tmp_path / "r").module(ids).logits, rtn, atol=1e-5)
