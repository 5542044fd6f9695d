"""Bad inputs a user can give: each is refused with one line and exit status 2, and nothing on
disk is created or changed. (`--force` never replaces what bitplan did not write.)"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from bitplan.cli import main


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its bytes (folders as empty strings)."""
    state = {}
    for path in sorted(root.rglob("*")):
        data = path.read_bytes() if path.is_file() else b""
        state[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return state


@pytest.fixture()
def workspace(tmp_path, tiny_folder):
    """A tiny model folder and a plan for it, made by the command itself."""
    plans = tmp_path / "plans"
    assert main(["search", str(tiny_folder), "--options", "w2g32,w4g32", "--avg-bits", "3",
                 "--n-samples", "4", "--seq-len", "32", "--out", str(plans)]) == 0  # fmt: skip
    return tiny_folder, plans / "plan_bitplan_3.json"


def refused(argv: list[str], capsys, root: Path, match: str) -> None:
    """``bitplan argv`` exits 2 with one line naming ``match``, and ``root`` is untouched."""
    before = tree_state(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("bitplan: error:") and match in err, err
    assert "Traceback" not in err
    assert tree_state(root) == before


def plan_refused(model: Path, data: dict, capsys, root: Path, match: str) -> None:
    """``bitplan quantize`` with the plan ``data`` (written beside, as an edited plan file) is
    ``refused``."""
    edited = root / "edited.json"
    edited.write_text(json.dumps(data))
    argv = ["quantize", str(model), "--plan", str(edited), "--format", "fake",
            "--out", str(root / "q")]  # fmt: skip
    refused(argv, capsys, root, match)


@pytest.mark.parametrize("fmt", ["fake", "packed"])
def test_force_never_replaces_the_model_being_read(workspace, tmp_path, capsys, fmt):
    model, plan = workspace
    argv = ["quantize", str(model), "--plan", str(plan), "--format", fmt, "--out", str(model)]
    refused([*argv, "--force"], capsys, tmp_path, "is where the model is read from")
    refused(argv, capsys, tmp_path, "is where the model is read from")


def test_force_never_replaces_a_folder_holding_the_model(workspace, tmp_path, capsys):
    model, plan = workspace
    argv = ["quantize", str(model), "--plan", str(plan), "--format", "fake"]
    refused([*argv, "--out", str(tmp_path), "--force"], capsys, tmp_path, "read from")


def test_force_never_replaces_a_folder_bitplan_did_not_write(workspace, tmp_path, capsys):
    model, plan = workspace
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("a week of work")
    argv = ["quantize", str(model), "--plan", str(plan), "--format", "packed", "--out"]
    refused([*argv, str(theirs), "--force"], capsys, tmp_path, "bitplan did not write it")


def test_force_never_replaces_a_file_bitplan_did_not_write(workspace, tmp_path, capsys):
    model, plan = workspace
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"GGUF but not ours")
    argv = ["quantize", str(model), "--plan", str(plan), "--format", "gguf", "--out"]
    refused([*argv, str(theirs), "--force"], capsys, tmp_path, "bitplan did not write it")


def test_search_quantize_refuses_the_model_folder_before_scoring(workspace, tmp_path, capsys):
    model, _ = workspace
    argv = ["search", str(model), "--options", "w2g32,w4g32", "--avg-bits", "3",
            "--out", str(tmp_path / "p2"), "--quantize", str(model), "--format", "fake",
            "--force"]  # fmt: skip
    refused(argv, capsys, tmp_path, "is where the model is read from")


def test_force_replaces_bitplans_own_export(workspace, tmp_path):
    model, plan = workspace
    out = tmp_path / "export"
    argv = ["quantize", str(model), "--plan", str(plan), "--format", "packed", "--out", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--force"]) == 0  # its own earlier export: replaced
    argv[argv.index("packed")] = "fake"
    assert main([*argv, "--force"]) == 0  # any bitplan folder export may replace another


@pytest.mark.parametrize("budget", ["nan", "inf", "0", "-3"])
def test_search_refuses_a_budget_that_is_not_bits_before_loading(
    workspace, tmp_path, capsys, budget
):
    model, _ = workspace
    argv = ["search", str(model), "--options", "w2g32,w4g32", "--out", str(tmp_path / "new"),
            "--avg-bits", budget]  # fmt: skip
    refused(argv, capsys, tmp_path, "is not a number of bits per weight")


def test_search_refuses_a_file_as_out_before_scoring(workspace, tmp_path, capsys):
    model, _ = workspace
    (tmp_path / "plans.txt").write_text("mine")
    argv = ["search", str(model), "--options", "w2g32,w4g32", "--avg-bits", "3",
            "--out", str(tmp_path / "plans.txt")]  # fmt: skip
    refused(argv, capsys, tmp_path, "is a file")


def test_search_says_when_a_budget_is_above_every_option(workspace, tmp_path, capsys):
    model, _ = workspace
    argv = ["search", str(model), "--options", "w2g32,w4g32", "--avg-bits", "20",
            "--n-samples", "4", "--seq-len", "32", "--out", str(tmp_path / "p")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "note: target 20 bits is above what w2g32,w4g32 can use here" in out


def test_a_damaged_score_cache_heals(workspace, tmp_path, capsys):
    model, _ = workspace  # its search filled the cache under BITPLAN_CACHE
    (cached,) = (tmp_path / "cache" / "scores").glob("*.json")
    cached.write_text(cached.read_text()[:100])  # cut short, as by a crash mid-copy
    argv = ["search", str(model), "--options", "w2g32,w4g32", "--avg-bits", "3",
            "--n-samples", "4", "--seq-len", "32", "--out", str(tmp_path / "again")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert "warning: deleting unreadable cached scores" in capsys.readouterr().err
    json.loads(cached.read_text())  # computed again and cached whole
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err  # and read from the cache from then on


def test_uniform_recipe_refuses_a_budget_before_loading(tmp_path, capsys):
    argv = ["search", str(tmp_path / "absent"), "--options", "w2g32,w4g32", "--recipe",
            "uniform", "--avg-bits", "5", "--out", str(tmp_path / "p")]  # fmt: skip
    refused(argv, capsys, tmp_path, "takes no --avg-bits")


def test_head_recipe_needs_a_budget_before_loading(tmp_path, capsys):
    argv = ["search", str(tmp_path / "absent"), "--options", "w2g32,w4g32", "--recipe", "head",
            "--out", str(tmp_path / "p")]  # fmt: skip
    refused(argv, capsys, tmp_path, "needs --avg-bits")


def test_missing_calibration_file_refused_before_loading(tmp_path, capsys):
    argv = ["search", str(tmp_path / "absent"), "--options", "w2g32,w4g32", "--avg-bits", "3",
            "--calib", str(tmp_path / "no-such.txt"), "--out", str(tmp_path / "p")]  # fmt: skip
    refused(argv, capsys, tmp_path, "no-such.txt")


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_unknown_task_refused_before_loading(tmp_path, capsys, command):
    argv = [command, str(tmp_path / "absent"), "--tasks", "hellaswag,no_such_task"]
    refused(argv, capsys, tmp_path, "no_such_task")


@pytest.mark.parametrize(
    ("rounding", "setting", "match"),
    [("rtn,awq", "w2g32,w4g32:3", "awq"), ("rtn,tuned", "q4_k,q8_0:5", "q4_k")],
)
def test_compare_refuses_a_rounding_it_cannot_do_before_loading(
    tmp_path, capsys, rounding, setting, match
):
    argv = ["compare", str(tmp_path / "absent"), "--setting", setting, "--rounding", rounding,
            "--no-tasks", "--out", str(tmp_path / "r")]  # fmt: skip
    refused(argv, capsys, tmp_path, match)


def test_quantize_refuses_an_existing_file_as_out_before_loading(workspace, tmp_path, capsys):
    model, plan = workspace
    (tmp_path / "mine.bin").write_text("mine")
    argv = ["quantize", str(tmp_path / "absent"), "--plan", str(plan), "--format", "fake",
            "--out", str(tmp_path / "mine.bin")]  # fmt: skip
    refused(argv, capsys, tmp_path, "mine.bin")


def test_an_unwritable_out_is_refused_before_loading(workspace, tmp_path, capsys):
    model, plan = workspace
    argv = ["quantize", str(model), "--plan", str(plan), "--format", "fake",
            "--out", "/proc/bitplan-export"]  # fmt: skip
    refused(argv, capsys, tmp_path, "cannot write")


def test_the_current_folder_is_never_an_export_destination(
    workspace, tmp_path, capsys, monkeypatch
):
    model, plan = workspace
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", str(model), "--plan", str(plan), "--format", "fake", "--out", ".",
            "--force"]  # fmt: skip
    refused(argv, capsys, tmp_path, "read from")


def test_a_plan_missing_a_layer_is_refused(workspace, tmp_path, capsys):
    model, plan = workspace
    data = json.loads(plan.read_text())
    del data["layer_formats"][next(iter(data["layer_formats"]))]
    plan_refused(model, data, capsys, tmp_path, "does not cover")


def test_a_plan_contradicting_its_fusion_groups_is_refused(workspace, tmp_path, capsys):
    model, plan = workspace
    data = json.loads(plan.read_text())
    layers = data["layer_formats"]
    q = next(name for name in layers if name.endswith("q_proj"))
    k = q.replace("q_proj", "k_proj")
    layers[q], layers[k] = "w2g32", "w4g32"
    plan_refused(model, data, capsys, tmp_path, "fusion group")


def test_a_plan_whose_bits_were_edited_is_refused(workspace, tmp_path, capsys):
    model, plan = workspace
    data = json.loads(plan.read_text())
    # every layer (and group) moved to the larger option: consistent, but not the plan's bits
    for table in (data["layer_formats"], data["group_formats"]):
        table.update(dict.fromkeys(table, "w4g32"))
    plan_refused(model, data, capsys, tmp_path, "average bits but its layers cost")


def test_a_plan_over_its_budget_is_refused(workspace, tmp_path, capsys):
    model, _ = workspace
    assert main(["search", str(model), "--options", "w4g32", "--recipe", "uniform",
                 "--out", str(tmp_path / "u")]) == 0  # fmt: skip
    uniform = next((tmp_path / "u").glob("plan_*.json"))
    data = json.loads(uniform.read_text())
    data["budget_avg_bits"] = 3.0  # a budget its (all 4-bit) layers exceed
    plan_refused(model, data, capsys, tmp_path, "over its budget of 3")


@pytest.mark.parametrize("keep", [0, 100, 5000])
def test_a_truncated_model_file_is_one_line(workspace, tmp_path, capsys, keep):
    model, _ = workspace
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    argv = ["search", str(model), "--options", "w2g32,w4g32", "--avg-bits", "3",
            "--n-samples", "4", "--seq-len", "32", "--out", str(tmp_path / "p")]  # fmt: skip
    refused(argv, capsys, tmp_path, ".safetensors")
    refused([*argv, "--stream"], capsys, tmp_path, "model.safetensors")


@pytest.mark.parametrize("keep", [0, 3, 100, 20000])
def test_a_truncated_gguf_is_one_line(tmp_path, capsys, keep):
    from bitplan.model.bundled import DEFAULT

    with DEFAULT.gguf_path().open("rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(keep))
    argv = ["info", str(tmp_path / "cut.gguf")]
    refused(argv, capsys, tmp_path, "cut.gguf")


def test_a_recipe_search_into_an_old_folder_drops_other_options_scores(workspace, capsys):
    model, plan = workspace  # plan's folder holds scores.json and front.json of w2g32,w4g32
    folder = plan.parent
    argv = ["search", str(model), "--options", "w4g32,w8g32", "--recipe", "uniform",
            "--out", str(folder)]  # fmt: skip
    assert main(argv) == 0
    assert "removed" in capsys.readouterr().out
    assert not (folder / "scores.json").exists() and not (folder / "front.json").exists()
    assert plan.is_file()  # the earlier plans stay: they say which options they chose from


# Odd inputs beyond the list, as a fuzzer would try them: each builds its input under
# tmp_path and returns the command line, and the match its one-line error must contain.
def _file(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _model_with_config(tmp: Path, config: bytes) -> str:
    _file(tmp / "bad-model" / "config.json", config)
    return str(tmp / "bad-model")


def _search(model: str, *extra: str, options: str = "w2g32,w4g32", bits: str = "3") -> list[str]:
    return ["search", model, "--options", options, "--avg-bits", bits, "--n-samples", "4",
            "--seq-len", "32", *extra, "--out", "OUT"]  # fmt: skip


def _plan_edit(plan: Path, tmp: Path, **fields) -> str:
    data = json.loads(plan.read_text())
    data.update(fields)
    return _file(tmp / "edited.json", json.dumps(data))


_ODD_INPUTS = {
    "empty budget": (lambda m, p, t: _search(m, bits=""), "invalid float value"),
    "budget list with a gap": (lambda m, p, t: _search(m, bits="3,,4"), "invalid float value"),
    "hex budget": (lambda m, p, t: _search(m, bits="0x10"), "invalid float value"),
    "fractional sequence length": (
        lambda m, p, t: [*_search(m)[:-2], "--seq-len", "1.5", "--out", "OUT"],
        "invalid int value",
    ),
    "huge group size": (lambda m, p, t: _search(m, options="w2g" + "9" * 20), "larger than"),
    "config.json of odd bytes": (
        lambda m, p, t: _search(_model_with_config(t, b"\x00\xff\xfe")),
        "not a model configuration",
    ),
    "config.json an array": (
        lambda m, p, t: _search(_model_with_config(t, b"[]")),
        "a JSON array",
    ),
    "random bytes as .gguf": (
        lambda m, p, t: _search(_file(t / "r.gguf", bytes(range(256)) * 8)),
        "r.gguf",
    ),
    "GGUF magic then noise": (
        lambda m, p, t: _search(_file(t / "n.gguf", b"GGUF" + bytes(range(60)))),
        "n.gguf",
    ),
    "calibration text of odd bytes": (
        lambda m, p, t: _search(m, "--calib", _file(t / "c.txt", b"\xb3\x00\xff" * 100)),
        "not UTF-8",
    ),
    "plan of odd bytes": (
        lambda m, p, t: ["quantize", m, "--plan", _file(t / "x.json", b"\xe8\x01" * 50)],
        "not a plan file",
    ),
    "plan null": (lambda m, p, t: ["quantize", m, "--plan", _file(t / "x.json", "null")], "null"),
    "plan layers a list": (
        lambda m, p, t: ["quantize", m, "--plan", _plan_edit(p, t, layer_formats=[])],
        "layer_formats",
    ),
    "plan bits a string": (
        lambda m, p, t: ["quantize", m, "--plan", _plan_edit(p, t, avg_bits="3")],
        "avg_bits",
    ),
    "plan bits true": (
        lambda m, p, t: ["quantize", m, "--plan", _plan_edit(p, t, avg_bits=True)],
        "avg_bits",
    ),
    "plan bits NaN": (
        lambda m, p, t: ["quantize", m, "--plan", _plan_edit(p, t, avg_bits=float("nan"))],
        "says nan average bits",
    ),
    "plan budget -inf": (
        lambda m, p, t: ["quantize", m, "--plan", _plan_edit(p, t, budget_avg_bits=-math.inf)],
        "over its budget",
    ),
    "unknown export format": (
        lambda m, p, t: ["quantize", m, "--plan", str(p), "--format", "zip"],
        "invalid choice",
    ),
}


@pytest.mark.parametrize("case", list(_ODD_INPUTS))
def test_an_odd_input_is_one_line(workspace, tmp_path, capsys, case):
    model, plan = workspace
    build, match = _ODD_INPUTS[case]
    argv = build(str(model), plan, tmp_path / "inputs")
    if argv[0] == "quantize" and "--out" not in argv:
        argv += ["--out", "OUT"]
    if "--format" not in argv and argv[0] == "quantize":
        argv += ["--format", "fake"]
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    refused(argv, capsys, tmp_path, match)


def test_force_never_follows_a_symbolic_link(workspace, tmp_path, capsys):
    model, plan = workspace
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    argv = ["quantize", str(model), "--plan", str(plan), "--format", "fake",
            "--out", str(tmp_path / "link"), "--force"]  # fmt: skip
    refused(argv, capsys, tmp_path, "symbolic link")


def test_paths_with_spaces_unicode_and_links_work(workspace, tmp_path):
    model, plan = workspace
    odd = tmp_path / "mödel 日本 with spaces"
    shutil.copytree(model, odd)
    (tmp_path / "link").symlink_to(odd)
    for source in (odd, tmp_path / "link"):
        out = tmp_path / f"ausgabe ü {source.name}"
        assert main(_search(str(source))[:-1] + [str(out / "plans")]) == 0
        assert main(["quantize", str(source), "--plan", str(out / "plans" / plan.name),
                     "--format", "fake", "--out", str(out / "model")]) == 0  # fmt: skip
        assert (out / "model" / "config.json").is_file()


def test_a_huge_budget_gives_the_largest_plan(workspace, tmp_path, capsys):
    model, _ = workspace
    assert main(_search(str(model), bits="1e308")[:-1] + [str(tmp_path / "p")]) == 0
    assert "above" in capsys.readouterr().out
    plan = json.loads(next((tmp_path / "p").glob("plan_*.json")).read_text())
    assert set(plan["layer_formats"].values()) == {"w4g32"}
