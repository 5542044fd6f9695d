"""The compute dtype chosen per device: measured on CPUs, cached per machine, overridable."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bitplan import compute
from bitplan.atomic import file_lock, write_json_atomic
from bitplan.errors import BitplanError


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path))
    return tmp_path


def test_explicit_dtype_is_taken_as_asked():
    assert compute.choose_dtype("cpu", "float32").dtype == torch.float32
    assert compute.choose_dtype("cpu", "bfloat16").name == "bfloat16"
    with pytest.raises(BitplanError, match="unknown dtype"):
        compute.choose_dtype("cpu", "float8")


@pytest.mark.parametrize(
    ("float32_s", "bfloat16_s", "expected"),
    [
        (0.09, 0.37, torch.float32),  # an AVX2-only CPU: bfloat16 emulated, 4x slower
        (0.034, 0.030, torch.float32),  # barely faster: not worth its rounding
        (0.034, 0.014, torch.bfloat16),  # AVX512-BF16: 2.4x faster
    ],
)
def test_auto_on_cpu_follows_the_measurement(cache, monkeypatch, float32_s, bfloat16_s, expected):
    monkeypatch.setattr(
        compute, "_measure", lambda: {"float32_s": float32_s, "bfloat16_s": bfloat16_s}
    )
    choice = compute.choose_dtype("cpu")
    assert choice.dtype == expected
    assert f"{float32_s / bfloat16_s:.2f}x" in choice.reason
    assert choice.describe().startswith(f"computing in {choice.name} on cpu")


def test_measurement_is_cached_per_machine_and_heals(cache, monkeypatch):
    calls = []

    def measure():
        calls.append(1)
        return {"float32_s": 0.09, "bfloat16_s": 0.37}

    monkeypatch.setattr(compute, "_measure", measure)
    first = compute.cpu_matmul_speeds()
    assert compute.cpu_matmul_speeds() == first and len(calls) == 1
    path = next((cache / "machine").glob("cpu-dtype-*.json"))
    assert json.loads(path.read_text())["capability"] == torch.backends.cpu.get_cpu_capability()
    path.write_text("{not json")  # a damaged cache file is measured again, not an error
    assert compute.cpu_matmul_speeds()["float32_s"] == 0.09 and len(calls) == 2


def test_real_micro_benchmark_runs():
    speeds = compute._measure(repeats=1)
    assert speeds["float32_s"] > 0 and speeds["bfloat16_s"] > 0


def test_autocast_is_off_for_float32():
    with compute.autocast("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with compute.autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_a_second_process_waits_for_the_first_ones_measurement(cache):
    """Two runs started together must choose the same dtype, or neither finds the other's cached
    scores: the second waits for the first one's measurement instead of measuring under load."""
    child_code = (
        "import sys; from bitplan import compute; "
        "path, identity = compute.speeds_cache_file(compute.cpu_description()); "
        "print(path, flush=True); print(identity, flush=True); sys.stdin.readline(); "
        "print(compute.cpu_matmul_speeds()['float32_s'], flush=True)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    path = Path(child.stdout.readline().strip())
    identity = child.stdout.readline().strip()
    with file_lock(path.with_suffix(".lock")):  # as a first process measuring
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(1.0)  # the child finds no cached result and waits (or, unlocked, measures)
        write_json_atomic(path, {"float32_s": 123.0, "bfloat16_s": 1.0, "identity": identity})
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    assert float(out) == 123.0  # the first one's result, not a second measurement
