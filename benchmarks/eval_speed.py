"""Time bitplan's evaluation entry point against lm-eval's own command line, same model and tasks.

    .venv/bin/python benchmarks/eval_speed.py --limit 100 --batch-size 8 --out /tmp/eval_speed

runs (1) ``bitplan.evaluation.evaluate_tasks`` on the embedded default model already in memory,
then (2) ``lm_eval --model hf`` on the same weights (the bf16 cache folder ``load_model`` reads,
loaded as float32) with the same offline tasks, limit and batch size, one after the other. It
prints both tables, and each run's wall time and CPU time (user + system; less sensitive than
wall time to other work on a shared machine). ``--which`` picks the runs: ``bitplan``,
``lm-eval``, and ``bitplan-hflm`` (bitplan's harness with lm-eval's own ``HFLM``
log-likelihoods, as before ``continuation_lm.py``); ``--profile`` prints where each bitplan
run spent its time (cProfile, the functions with the most time of their own).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bitplan.data.offline_tasks import DEFAULT_TASKS, OFFLINE_TASKS, TASKS_DIR, resolve_tasks
from bitplan.evaluation.continuation_lm import ContinuationLM
from bitplan.evaluation.harness import evaluate_tasks, format_results_table, results_from_lm_eval

#: ContinuationLM's own check, restored after a bitplan-hflm run switched it off.
TAKES_LOGITS_TO_KEEP = ContinuationLM._takes_logits_to_keep


def run_bitplan(
    tasks: list[str], limit: int, batch_size: int, out: Path, hflm: bool, profile: int
) -> tuple[float, float]:
    from bitplan.model import load_model

    if hflm:  # lm-eval's own log-likelihood code path
        ContinuationLM._takes_logits_to_keep = lambda self: False
    profiler = cProfile.Profile() if profile else None
    start, cpu = time.perf_counter(), time.process_time()
    loaded = load_model(None)
    load_s = time.perf_counter() - start
    if profiler:
        profiler.enable()
    results = evaluate_tasks(
        loaded.module,
        loaded.tokenizer,
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        output_json=out / ("bitplan_hflm.json" if hflm else "bitplan.json"),
    )
    if profiler:
        profiler.disable()
    name = "bitplan with lm-eval's HFLM" if hflm else "bitplan"
    print(f"== {name} evaluate_tasks on {loaded.name} ({loaded.note}); model load {load_s:.1f} s")
    print(format_results_table(results), flush=True)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(profile)
    return results.seconds + load_s, time.process_time() - cpu


def run_lm_eval_cli(
    tasks: list[str], limit: int, batch_size: int, out: Path
) -> tuple[float, float]:
    from bitplan.model.bundled import DEFAULT

    folder = DEFAULT.ensure_folder()
    lm_eval = Path(sys.executable).with_name("lm_eval")
    output = out / "lm_eval_cli"
    shutil.rmtree(output, ignore_errors=True)
    command = [
        str(lm_eval),
        "--model", "hf",
        "--model_args", f"pretrained={folder},dtype=float32",
        "--tasks", ",".join(OFFLINE_TASKS[t] for t in tasks),
        "--include_path", str(TASKS_DIR),
        "--limit", str(limit),
        "--batch_size", str(batch_size),
        "--device", "cpu",
        "--output_path", str(output),
    ]  # fmt: skip
    print("== lm-eval CLI:", " ".join(command), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start, cpu = time.perf_counter(), _children_cpu()
    with open(out / "lm_eval_cli.log", "w") as log:
        subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    result_file = max(output.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    raw = json.loads(result_file.read_text())
    results = results_from_lm_eval(raw, tasks, limit, batch_size, seconds)
    print(format_results_table(results), flush=True)
    return seconds, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--which", default="bitplan,lm-eval", help="comma-separated: bitplan, bitplan-hflm, lm-eval"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N functions by own time"
    )
    parser.add_argument("--out", type=Path, default=Path("eval_speed_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = resolve_tasks(args.tasks)
    times = {}
    which = args.which.split(",")
    if "bitplan-hflm" in which:
        times["bitplan, lm-eval's HFLM (load + evaluate)"] = run_bitplan(
            tasks, args.limit, args.batch_size, args.out, hflm=True, profile=args.profile
        )
    if "bitplan" in which:
        ContinuationLM._takes_logits_to_keep = TAKES_LOGITS_TO_KEEP
        times["bitplan (load + evaluate)"] = run_bitplan(
            tasks, args.limit, args.batch_size, args.out, hflm=False, profile=args.profile
        )
    if "lm-eval" in which:
        times["lm_eval CLI (whole command)"] = run_lm_eval_cli(
            tasks, args.limit, args.batch_size, args.out
        )
    print(f"\nlimit {args.limit}, batch size {args.batch_size}, {os.cpu_count()} CPUs:")
    print(f"  {'':<42} {'wall s':>8} {'CPU s':>8}")
    for name, (wall, cpu) in times.items():
        print(f"  {name:<42} {wall:8.1f} {cpu:8.1f}")
    print(f"  load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
