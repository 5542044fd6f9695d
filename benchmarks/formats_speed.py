"""Quantize-dequantize throughput of each number format on a random square float32 weight.

    .venv/bin/python benchmarks/formats_speed.py --size 4096 --repeats 3

Prints one row per format: the best wall time of ``quantize_weight`` over the repeats (after one
warm-up call) and the throughput that gives, in weights per second.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from bitplan.formats import parse_format

FORMAT_NAMES = [
    "w2g128",
    "w3g128",
    "w4g128",
    "w4g128_asym",
    "w8g128",
    "int8",
    "mxfp4",
    "mxfp6",
    "mxfp8",
    "nvfp4",
    "fp8",
    "bf16",
]


def best_time(function, repeats: int) -> float:
    """Best wall-clock seconds of ``function()`` over ``repeats`` calls, after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per format")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    weight = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; weight {args.size}x{args.size} float32, "
        f"best of {args.repeats}"
    )
    print()
    print("| format | bits/weight | best time (ms) | weights/s |")
    print("|---|---:|---:|---:|")
    numel = weight.numel()
    for name in FORMAT_NAMES:
        fmt = parse_format(name)
        seconds = best_time(lambda fmt=fmt: fmt.quantize_weight(weight), args.repeats)
        bits = fmt.bits_per_weight(tuple(weight.shape))
        print(f"| {name} | {bits:.4f} | {seconds * 1e3:.1f} | {numel / seconds:.3g} |")


if __name__ == "__main__":
    main()
