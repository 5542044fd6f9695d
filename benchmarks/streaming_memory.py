"""Peak memory (RSS) of `bitplan search` on the embedded default, with and without --stream.

Each run is a fresh process; its peak RSS is read from the kernel after it finishes.

    .venv/bin/python benchmarks/streaming_memory.py [--options mxfp4,mxfp8] [--n-samples 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` to completion; return (peak RSS in MB, wall seconds)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed: {log.read()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default="mxfp4,mxfp8")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    from bitplan.model.bundled import DEFAULT

    folder = DEFAULT.ensure_folder()
    disk_mb = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20
    bitplan = [sys.executable, "-m", "bitplan"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline, _ = peak_rss_of([sys.executable, "-c", "import torch, transformers, bitplan.cli"])
        for stream in (False, True):
            cmd = [*bitplan, "search", "--options", args.options, "--avg-bits", "5",
                   "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
                   "--out", f"{tmp}/{stream}", "--no-cache"]  # fmt: skip
            if stream:
                cmd.append("--stream")
            rows.append((stream, *peak_rss_of(cmd)))
    params = 134_515_008
    fp32_mb = params * 4 / 2**20
    print(f"model: {folder} ({disk_mb:.0f} MB of bf16 safetensors, {fp32_mb:.0f} MB as float32)")
    print(f"calibration {args.n_samples} x {args.seq_len} tokens, options {args.options}")
    print(f"python + torch + transformers imported, nothing loaded: {baseline:.0f} MB peak RSS")
    print(
        f"{'mode':<12} {'peak RSS MB':>12} {'above imports':>14} {'/ fp32 model':>13} {'seconds':>8}"
    )
    for stream, rss, seconds in rows:
        mode = "--stream" if stream else "in memory"
        print(
            f"{mode:<12} {rss:>12.0f} {rss - baseline:>14.0f} {rss / fp32_mb:>13.2f} {seconds:>8.0f}"
        )
    ratio = rows[1][1] / rows[0][1]
    print(f"streamed / in-memory peak RSS: {ratio:.2f}")


if __name__ == "__main__":
    main()
