"""What bitplan promises about the files it writes (docs/RELIABILITY.md): the user's permissions,
no temporaries left behind by a killed run once the next run writes there, and one scoring pass
for runs started together."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitplan.atomic import atomic_file, atomic_folder, write_json_atomic

_SEARCH = ["--options", "w2g32,w4g32", "--avg-bits", "3", "--n-samples", "4", "--seq-len", "32"]


def _bitplan(*argv: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bitplan.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_and_folders_get_the_users_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "plan.json", {"a": 1})
        with atomic_folder(tmp_path / "export") as folder:
            (folder / "weights.bin").write_bytes(b"x")
            (folder / "sub").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "plan.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "export" / "weights.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "export" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask


def test_stale_temporaries_are_removed_but_not_ones_in_use(tmp_path):
    stale_folder = tmp_path / ".export.tmp-dead"
    stale_folder.mkdir()
    (stale_folder / "half.bin").write_bytes(b"half")
    stale_file = tmp_path / ".export.old-dead"
    stale_file.write_bytes(b"old")
    busy = tmp_path / ".export.tmp-busy"
    busy.mkdir()
    other = tmp_path / ".elsewhere.tmp-dead"  # another destination's: not ours to judge
    other.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running writer holds its temporary
    try:
        with atomic_folder(tmp_path / "export") as folder:
            (folder / "a").write_text("a")
    finally:
        os.close(fd)
    assert not stale_folder.exists() and not stale_file.exists()
    assert busy.exists() and other.exists()
    assert (tmp_path / "export" / "a").read_text() == "a"


def test_a_killed_export_leaves_nothing_once_the_next_run_writes(tmp_path):
    """SIGKILL while an export is being written (inside the atomic folder), then a rerun."""
    code = (
        "import sys, time\n"
        "from bitplan.atomic import atomic_folder\n"
        "with atomic_folder(sys.argv[1]) as tmp:\n"
        "    (tmp / 'part').write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    out = tmp_path / "export"
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists() and list(tmp_path.glob(".export.tmp-*"))  # what a kill leaves
    with atomic_folder(out) as tmp:
        (tmp / "done").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with atomic_file(tmp_path / "single.gguf") as tmp:  # files: the same
        tmp.write_bytes(b"gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "single.gguf"]


def test_a_search_killed_while_scoring_then_run_again(tiny_folder, tmp_path):
    env = dict(os.environ)  # BITPLAN_CACHE set by tiny_folder
    out = tmp_path / "plans"
    argv = ["search", str(tiny_folder), *_SEARCH, "--out", str(out)]
    child = _bitplan(*argv, env=env)
    scores = Path(env["BITPLAN_CACHE"]) / "scores"
    deadline = time.monotonic() + 120
    while not list(scores.glob("*.lock")) and child.poll() is None:  # scoring has begun
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    rerun = _bitplan(*argv, env=env)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert (out / "plan_bitplan_3.json").is_file()
    leftovers = [p for p in tmp_path.rglob(".*.tmp-*")]
    assert not leftovers, leftovers


def test_two_searches_started_together_score_once(tiny_folder, tmp_path):
    env = dict(os.environ)
    runs = [
        _bitplan("search", str(tiny_folder), *_SEARCH, "--out", str(tmp_path / f"out{i}"), env=env)
        for i in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    from_cache = [out for out, _ in outputs if "(from cache)" in out]
    assert len(from_cache) == 1, outputs  # the other waited for the first one's scores


@pytest.mark.parametrize("delay", [0.2, 0.5, 1.0])
def test_ctrl_c_during_start_up_is_one_line(tmp_path, delay):
    """SIGINT while bitplan is still importing torch and transformers (which take seconds): at
    one moment, once, numpy turned the interrupt into an import error."""
    child = _bitplan("info", str(tmp_path / "absent"))
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert err.strip() == "bitplan: interrupted", err
