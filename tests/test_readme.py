"""The README's Python example runs as written (on the embedded default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_example() -> str:
    """The README's one ```python block."""
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return block


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes smollm2-mx5/ and plans/ where it runs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    namespace: dict = {}
    exec(compile(readme_python_example(), str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "piqa" in printed and "winogrande" in printed and "average (acc)" in printed
    assert (tmp_path / "smollm2-mx5" / "config.json").is_file()
    assert [p.name for p in namespace["result"].paths] == [
        "plan_bitplan_4p5.json",
        "plan_bitplan_5.json",
        "plan_bitplan_6.json",
    ]
    plans, head = namespace["plans"], namespace["head"]
    assert plans[4.5].avg_bits <= 4.5 and plans[6].avg_bits <= 6
    assert head.recipe == "head" and head.avg_bits <= 5
    assert namespace["report"].format == "packed" and namespace["report"].layers == 210
