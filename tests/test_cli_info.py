"""`bitplan info` and the command line's error handling."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bitplan.cli import main


def test_info_on_a_folder(tmp_path, tiny_model, tiny_tokenizer, capsys):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--formats", "mxfp4,w4g128,bf16", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "2 decoder blocks" in out and "14 quantizable" in out and "8 fusion groups" in out
    # hidden 96: mxfp4 = 4 + 8/32 exactly for every decoder layer (all in_features % 32 == 0)
    assert "mxfp4                   4.2500    4.0000" in out
    assert "bf16                   16.0000   16.0000" in out
    assert "model.layers.1.mlp.down_proj" in out


def test_missing_model_is_one_line_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bitplan", "info", str(tmp_path / "some/missing/path")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitplan: error: no model at")


def test_unknown_format_lists_known(tmp_path, tiny_model, tiny_tokenizer, capsys):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--formats", "mxfp5"]) == 2
    err = capsys.readouterr().err
    assert "mxfp5" in err and "mxfp4" in err


@pytest.mark.slow
def test_info_on_embedded_default(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "30 decoder blocks" in out and "210 quantizable" in out and "120 fusion groups" in out
    for role, count in [("q", 30), ("k", 30), ("v", 30), ("o", 30), ("down", 30)]:
        assert any(line.split()[:2] == [role, str(count)] for line in out.splitlines())
    assert "mxfp4" in out and "w4g128" in out and "nvfp4" in out
    assert "4-bit" in out  # the provenance note


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path))
    (tmp_path / "models" / "m-bf16").mkdir(parents=True)
    (tmp_path / "models" / "m-bf16" / "model.safetensors").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "s.json").write_text("{}")
    assert main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert "holds 2 entries" in listed and "3.0 MiB  m-bf16" in listed and "s.json" in listed
    assert main(["cache", "clear", "--kind", "scores"]) == 0
    assert "deleted 1 entries" in capsys.readouterr().out
    assert not (tmp_path / "scores" / "s.json").exists()
    assert (tmp_path / "models" / "m-bf16" / "model.safetensors").is_file()
    assert main(["cache", "clear", "--kind", "nonsense"]) == 2
