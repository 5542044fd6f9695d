"""`bitplan compare` end to end on the tiny model: structure, resumption, numbers from computation."""

from __future__ import annotations

import json
import math

import pytest

from bitplan.cli import main
from bitplan.comparison import _upgraded
from bitplan.compute import choose_dtype
from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.model import load_model
from bitplan.plans import Plan
from bitplan.quantization import apply_plan


def test_compare_end_to_end(tiny_folder, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "compare", str(tiny_folder),
        "--setting", "mxfp4,mxfp8:5:uniform,head,tail",
        "--setting", "w2g32,w4g32:3:head,tail",
        "--tasks", "piqa,winogrande", "--limit", "2",
        "--n-samples", "4", "--seq-len", "32",
        "--heldout-samples", "2", "--heldout-len", "32",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    variants = results["variants"]
    # BF16; plan + uniform + head + tail; plan + head + tail
    assert len(variants) == 1 + 4 + 3
    assert variants["bf16"]["divergence"]["kl"] == pytest.approx(0.0, abs=1e-5)
    for key, v in variants.items():
        assert math.isfinite(v["divergence"]["kl"]) and v["divergence"]["kl"] >= -1e-6, key
        assert set(v["tasks"]["tasks"]) == {"piqa", "winogrande"}, key
        for task in v["tasks"]["tasks"].values():
            assert 0.0 <= task["acc"] <= 1.0 and task["n"] == 2
        if key != "bf16":
            assert v["plan"]["avg_bits"] <= (v["budget"] or 99) + 1e-9
            assert v["divergence"]["kl"] > 0, key

    # A number in the report comes from a computation: redo one variant's KL independently.
    ours = variants["mxfp4,mxfp8|bitplan|5"]
    model = load_model(tiny_folder)
    dtype = choose_dtype("cpu").dtype  # what compare computed in (--dtype auto)
    tokens = heldout_samples(model.tokenizer, 2, 32)
    base = BaseLogits.compute(model.module, tokens, compute_dtype=dtype)
    plan = Plan.from_dict(ours["plan"])
    again = base.compare(apply_plan(model.module, plan), compute_dtype=dtype)
    assert again.kl == pytest.approx(ours["divergence"]["kl"], rel=1e-4)

    report = (out / "report.md").read_text()
    for v in variants.values():
        assert f"{v['divergence']['kl']:.4f}" in report
        assert v["label"] in report
    assert "## Table 1: mxfp4,mxfp8 mixed" in report and "## Table 2: w2g32,w4g32 mixed" in report
    assert "at an average of 5 bits" in report and "Does our plan beat the others?" in report
    # Every comparison is paired over the same documents (2 per task, 2 tasks).
    lines = [line for line in report.splitlines() if line.startswith("- mxfp4,mxfp8 at 5 bits")]
    for other in ("Head layers", "Tail layers", "Pure low-bit", "BF16"):
        assert sum(f"vs {other}" in line for line in lines) == 1, other
    assert all("(paired, 95 %, 4 documents)" in line for line in lines)
    assert len(variants["bf16"]["tasks"]["documents"]["piqa"]) == 2
    for placeholder in ("nan", "None", "TODO", "XXX"):
        assert placeholder not in report
    for png in (
        "accuracy_vs_bits.png",
        "bits_per_layer_mxfp4+mxfp8.png",
        "bits_per_layer_w2g32+w4g32.png",
    ):
        assert (out / png).stat().st_size > 10_000

    # Running again resumes: nothing is measured twice.
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming: 8 variant(s)" in capsys.readouterr().out
    again_results = json.loads((out / "results.json").read_text())
    for key, v in variants.items():
        assert again_results["variants"][key]["seconds"] == v["seconds"]


def test_compare_adds_the_rows_of_each_rounding(tiny_folder, tmp_path, capsys):
    """--rounding gptq: our plans scored for GPTQ, every plan GPTQ-rounded before measuring; a
    second run with --rounding rtn,tuned into the same folder keeps those rows and adds its own."""
    out = tmp_path / "report"
    common = [
        "compare", str(tiny_folder), "--setting", "w2g32,w4g32:3:head", "--no-tasks",
        "--n-samples", "4", "--seq-len", "32", "--heldout-samples", "2", "--heldout-len", "32",
        "--out", str(out),
    ]  # fmt: skip
    assert main([*common, "--rounding", "gptq"]) == 0
    first = json.loads((out / "results.json").read_text())["variants"]
    assert set(first) == {"bf16", "w2g32,w4g32|bitplan|3|gptq", "w2g32,w4g32|head|3|gptq"}
    model = load_model(tiny_folder)
    dtype = choose_dtype("cpu").dtype
    tokens = heldout_samples(model.tokenizer, 2, 32)
    base = BaseLogits.compute(model.module, tokens, compute_dtype=dtype)

    def rtn_kl(variant: dict) -> float:
        plan = Plan.from_dict(variant["plan"])
        return base.compare(apply_plan(model.module, plan), compute_dtype=dtype).kl

    for key in ("w2g32,w4g32|bitplan|3|gptq", "w2g32,w4g32|head|3|gptq"):
        assert first[key]["rounding"] == first[key]["plan"]["rounding"] == "gptq"
        assert first[key]["label"].endswith(" + GPTQ")
        assert first[key]["divergence"]["kl"] != pytest.approx(rtn_kl(first[key]), rel=1e-3)

    capsys.readouterr()
    assert main([*common, "--rounding", "tuned,rtn"]) == 0
    assert "resuming: 3 variant(s)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["roundings"] == ["rtn", "gptq", "tuned"]
    variants = results["variants"]
    assert len(variants) == 1 + 3 * 2
    for key, variant in first.items():  # measured once, kept as they were
        assert variants[key]["seconds"] == variant["seconds"]
    for recipe in ("bitplan", "head"):
        rtn, gptq, tuned = (
            variants[f"w2g32,w4g32|{recipe}|3{suffix}"] for suffix in ("", "|gptq", "|tuned")
        )
        assert rtn["rounding"] == "rtn" and tuned["rounding"] == "tuned"
        assert rtn["divergence"]["kl"] == pytest.approx(rtn_kl(rtn), rel=1e-4)
        # tuned plans are scored as GPTQ's (its starting point): the same layer formats
        assert tuned["plan"]["layer_formats"] == gptq["plan"]["layer_formats"]
        assert tuned["plan"]["rounding"] == "tuned"
    report = (out / "report.md").read_text()
    for variant in variants.values():
        assert f"| {variant['label']} |" in report
    assert "Rounding: round-to-nearest" in report and "GPTQ, block by block" in report
    assert "GPTQ then block tuning" in report
    # Ours against head within each rounding, never across.
    assert "- w2g32,w4g32 at 3 bits, tuned vs Head layers 4-bit + tuned:" in report
    assert "- w2g32,w4g32 at 3 bits vs Head layers 4-bit:" in report
    assert "tuned vs Head layers 4-bit:" not in report
    assert "- w2g32,w4g32 at 3 bits, tuned vs Ours 3-bit:" in report  # what tuning buys
    assert (out / "bits_per_layer_w2g32+w4g32_tuned.png").is_file()


def test_results_of_one_rounding_read_as_rows_of_that_rounding():
    """results.json written when compare took one --rounding keyed variants without it."""
    old = {
        "version": 1,
        "config": {"tasks": [], "rounding": "gptq"},
        "variants": {
            "bf16": {"label": "BF16", "recipe": "bf16"},
            "w2,w4|head|3": {"label": "Head layers 4-bit", "recipe": "head"},
        },
    }
    new = _upgraded(old)
    assert new["config"] == {"tasks": [], "roundings": ["gptq"]}
    assert new["variants"] == {
        "bf16": {"label": "BF16", "recipe": "bf16", "rounding": "rtn"},
        "w2,w4|head|3|gptq": {
            "label": "Head layers 4-bit + GPTQ",
            "recipe": "head",
            "rounding": "gptq",
        },
    }
    older = _upgraded({"config": {"tasks": []}, "variants": {"w2,w4|head|3": {"label": "H"}}})
    assert older["config"]["roundings"] == ["rtn"]
    assert older["variants"] == {"w2,w4|head|3": {"label": "H", "rounding": "rtn"}}
