"""Wall time and peak memory of scoring on the embedded default model.

Each (scorer, option set) runs in its own fresh process, so that peak RSS is that run's alone;
runs alternate between scorers so that a noisy machine affects both alike.

    .venv/bin/python benchmarks/search_cost.py [--repeats 1] [--n-samples 16 --seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

OPTION_SETS = {2: "mxfp4,mxfp8", 4: "mxfp4,mxfp6,mxfp8,nvfp4"}
SCORERS = ("fisher", "delta-loss")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(scorer: str, options: str, n_samples: int, seq_len: int) -> None:
    from bitplan.data.calibration import calibration_samples
    from bitplan.model import load_model
    from bitplan.score import score

    model = load_model()
    tokens = calibration_samples(model.tokenizer, n_samples=n_samples, seq_len=seq_len)
    loaded = rss_mb()
    start = time.perf_counter()
    score(model, options.split(","), tokens, scorer=scorer, cache=False, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rss_after_load_mb": loaded}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("SCORER", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.n_samples, args.seq_len)
        return
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for n_options, options in OPTION_SETS.items():
            for scorer in SCORERS:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    scorer,
                    options,
                    "--n-samples",
                    str(args.n_samples),
                    "--seq-len",
                    str(args.seq_len),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results.setdefault((scorer, n_options), []).append(json.loads(out.splitlines()[-1]))
    print(f"calibration: {args.n_samples} x {args.seq_len} tokens; best of {args.repeats}")
    print(
        f"{'scorer':<12} {'options':>7} {'seconds':>8} {'peak RSS MB':>12} {'RSS after load':>15}"
    )
    for (scorer, n_options), runs in sorted(results.items()):
        best = min(runs, key=lambda r: r["seconds"])
        print(
            f"{scorer:<12} {n_options:>7} {best['seconds']:>8.1f} {best['peak_rss_mb']:>12.0f} "
            f"{best['rss_after_load_mb']:>15.0f}"
        )
    for n_options in OPTION_SETS:
        fisher = min(r["seconds"] for r in results[("fisher", n_options)])
        delta = min(r["seconds"] for r in results[("delta-loss", n_options)])
        print(f"time fisher / delta-loss with {n_options} options: {fisher / delta:.2f}")


if __name__ == "__main__":
    main()
