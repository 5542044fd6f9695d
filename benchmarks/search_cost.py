"""The cost curve of scoring: wall time and peak memory against calibration tokens, parameters,
vocabulary and number of options, in float32 and bfloat16, with fitted growth exponents.

Models: the embedded default (real weights) and randomly initialised models built from the
configs of real checkpoints (SmolLM2 135M/360M/1.7B, Qwen3-0.6B, Gemma-3-270M, Llama-3.2-1B),
plus SmolLM2-135M's body with 36 blocks and with larger vocabularies, to vary one thing at a
time. Scoring cost does not depend on weight values, so random weights measure it faithfully.

Each case runs in its own fresh process, so that peak RSS is that case's alone, and its result
is appended to ``--out`` as soon as it is done: a re-run resumes where the last one stopped.

    .venv/bin/python benchmarks/search_cost.py [--out out/search_cost.jsonl] [--sweeps tokens,...]
    .venv/bin/python benchmarks/search_cost.py --report-only   # print the table from --out
    .venv/bin/python benchmarks/search_cost.py --scorers       # fisher against delta-loss
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

OPTION_SETS = {
    2: "mxfp4,mxfp8",
    4: "mxfp4,mxfp6,mxfp8,nvfp4",
    6: "mxfp4,mxfp6,mxfp8,nvfp4,w4a16,w8a16",
}
DTYPES = ("float32", "bfloat16")
SEQ_LEN = 256

# Real checkpoints' shapes (from their config.json); only what sets the cost is kept.
_SMOLLM2_135M = dict(
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)
CONFIGS: dict[str, dict] = {
    "SmolLM2-135M": _SMOLLM2_135M,
    "SmolLM2-135M, 36 blocks": {**_SMOLLM2_135M, "num_hidden_layers": 36},
    "SmolLM2-135M, vocab 152k": {**_SMOLLM2_135M, "vocab_size": 151936},
    "SmolLM2-135M, vocab 262k": {**_SMOLLM2_135M, "vocab_size": 262144},
    "SmolLM2-360M": dict(
        _SMOLLM2_135M,
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
    ),
    "SmolLM2-1.7B": dict(
        _SMOLLM2_135M,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "Qwen3-0.6B": dict(
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Gemma-3-270M": dict(
        model_type="gemma3_text",
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        sliding_window=512,
        tie_word_embeddings=True,
    ),
    "Llama-3.2-1B": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}
EMBEDDED = "SmolLM2-135M (embedded)"

# Each sweep varies one thing: (model, calibration samples of SEQ_LEN tokens, options).
SWEEPS: dict[str, list[tuple[str, int, int]]] = {
    "tokens": [(EMBEDDED, n, 2) for n in (4, 8, 16, 32)],
    "options": [(EMBEDDED, 16, n) for n in (2, 4, 6)],
    "parameters": [
        (name, 4, 2)
        for name in ("SmolLM2-135M", "SmolLM2-135M, 36 blocks", "SmolLM2-360M", "SmolLM2-1.7B")
    ],
    "vocabulary": [
        (name, 4, 2)
        for name in ("SmolLM2-135M", "SmolLM2-135M, vocab 152k", "SmolLM2-135M, vocab 262k")
    ],
    "shapes": [(name, 4, 2) for name in ("Gemma-3-270M", "Qwen3-0.6B", "Llama-3.2-1B")],
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(model_name: str):
    """The model to score and calibration-token source for ``model_name``."""
    from bitplan.model import load_model

    if model_name == EMBEDDED:
        return load_model()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitplan.model.loading import LoadedModel

    settings = dict(CONFIGS[model_name])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(module=module, tokenizer=None, name=model_name, source="random")


def child(model_name: str, n_samples: int, n_options: int, dtype: str, scorer: str) -> None:
    import torch

    from bitplan.compute import cpu_description
    from bitplan.data.calibration import calibration_samples
    from bitplan.scoring import score

    model = _build(model_name)
    if model.tokenizer is None:
        vocab = model.module.get_output_embeddings().weight.shape[0]
        tokens = torch.randint(
            0, vocab, (n_samples, SEQ_LEN), generator=torch.Generator().manual_seed(0)
        )
    else:
        tokens = calibration_samples(model.tokenizer, n_samples=n_samples, seq_len=SEQ_LEN)
    head = model.module.get_output_embeddings().weight
    layers = model.layers.selected(include_head=False)
    budgeted = sum(layer.params for layer in layers)
    loaded = rss_mb()
    start = time.perf_counter()
    score(
        model,
        OPTION_SETS[n_options].split(","),
        tokens,
        scorer=scorer,
        cache=False,
        progress=False,
        dtype=dtype,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_after_load_mb": loaded,
        "tokens": int(tokens.numel()),
        "budgeted_params": budgeted,
        "head_params": head.numel(),
        "vocab": head.shape[0],
        "blocks": model.module.config.num_hidden_layers,
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(record))


def _case_key(sweep: str, model: str, n_samples: int, n_options: int, dtype: str, scorer: str):
    return f"{sweep}|{model}|{n_samples}x{SEQ_LEN}|{n_options}|{dtype}|{scorer}"


def run_cases(
    out: Path, sweeps: list[str], dtypes: list[str], scorer: str = "fisher", repeats: int = 1
) -> None:
    """Run every case not yet in ``out`` ``repeats`` times, each in a fresh process, keeping the
    fastest (the one least disturbed by anything else on the machine); dtypes alternate so that
    drift hits both alike."""
    done = (
        {json.loads(line)["key"] for line in out.read_text().splitlines()}
        if out.is_file()
        else set()
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    for sweep in sweeps:
        for model, n_samples, n_options in SWEEPS[sweep]:
            for dtype in dtypes:
                key = _case_key(sweep, model, n_samples, n_options, dtype, scorer)
                if key in done:
                    continue
                print(f"{key} ...", end=" ", flush=True)
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    model,
                    str(n_samples),
                    str(n_options),
                    dtype,
                    scorer,
                ]
                runs = []
                for _ in range(repeats):
                    result = subprocess.run(cmd, capture_output=True, text=True)
                    if result.returncode != 0:
                        print(f"failed:\n{result.stderr[-2000:]}")
                        break
                    runs.append(json.loads(result.stdout.splitlines()[-1]))
                if len(runs) < repeats:
                    continue
                record = min(runs, key=lambda r: r["seconds"])
                record.update(
                    key=key,
                    sweep=sweep,
                    model=model,
                    options=n_options,
                    dtype=dtype,
                    scorer=scorer,
                    all_seconds=[r["seconds"] for r in runs],
                )
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(
                    f"{record['seconds']:.1f} s (best of {repeats}), {record['peak_rss_mb']:.0f} MB"
                )


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: a part that does not grow with x, and one that does."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def fitted_exponent(xs: list[float], ys: list[float]) -> float:
    """Slope of log y against log x (least squares): 1.0 means y grows linearly with x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def report(out: Path) -> None:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    if not records:
        print("no results yet")
        return
    cpu = records[0]["cpu"]
    print(f"CPU: {cpu}; torch {records[0]['torch']}, {records[0]['threads']} threads")
    print(f"calibration windows of {SEQ_LEN} tokens; every run alone, in its own process\n")
    header = (
        "| sweep | model | blocks | vocab | budgeted params | tokens | options | dtype | seconds "
        "| peak RSS MB | ns per token per M params |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in records:
        per = r["seconds"] / r["tokens"] / (r["budgeted_params"] / 1e6) * 1e9
        print(
            f"| {r['sweep']} | {r['model']} | {r['blocks']} | {r['vocab']} | "
            f"{r['budgeted_params'] / 1e6:.0f}M | {r['tokens']} | {r['options']} | {r['dtype']} | "
            f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {per:.1f} |"
        )
    print()
    for dtype in DTYPES:
        rows = [r for r in records if r["dtype"] == dtype and r["scorer"] == "fisher"]
        tokens = [r for r in rows if r["sweep"] == "tokens"]
        if len(tokens) > 1:
            xs, ys = [r["tokens"] for r in tokens], [r["seconds"] for r in tokens]
            fixed, per_token = linear_fit(xs, ys)
            print(
                f"{dtype}: seconds ~ tokens^{fitted_exponent(xs, ys):.2f}; as a line: "
                f"{fixed:.1f} s + {per_token * 1e3:.2f} ms per token"
            )
        params = [r for r in rows if r["sweep"] == "parameters"]
        if len(params) > 1:
            e = fitted_exponent(
                [r["budgeted_params"] for r in params], [r["seconds"] for r in params]
            )
            print(f"{dtype}: seconds ~ budgeted params^{e:.2f} (vocabulary fixed at 49,152)")
        options = [r for r in rows if r["sweep"] == "options"]
        if len(options) > 1:
            base = min(options, key=lambda r: r["options"])
            steps = ", ".join(
                f"{r['options']} options {r['seconds'] / base['seconds']:.2f}x" for r in options
            )
            print(f"{dtype}: against {base['options']} options: {steps}")
        vocab = sorted((r for r in rows if r["sweep"] == "vocabulary"), key=lambda r: r["vocab"])
        if len(vocab) > 1:
            base = vocab[0]
            for r in vocab[1:]:
                extra = r["seconds"] - base["seconds"]
                # The head's own work per token: logits forward and their gradient back to the
                # hidden state, two matmuls of hidden x vocab; what the extra vocabulary adds.
                width = base["head_params"] / base["vocab"]
                flops = 2 * 2 * width * (r["vocab"] - base["vocab"]) * r["tokens"]
                print(
                    f"{dtype}: vocab {base['vocab']} -> {r['vocab']}: +{extra:.1f} s "
                    f"({extra / r['tokens'] * 1e6:.0f} us per token; the head's extra matmuls "
                    f"are {flops / 1e9:.0f} GFLOP, i.e. {flops / 1e9 / max(extra, 1e-9):.0f} GFLOP/s)"
                )


def compare_scorers(repeats: int, n_samples: int) -> None:
    """The older question: fisher against delta-loss on the embedded default."""
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for n_options in (2, 4):
            for scorer in ("fisher", "delta-loss"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    EMBEDDED,
                    str(n_samples),
                    str(n_options),
                    "auto",
                    scorer,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results.setdefault((scorer, n_options), []).append(
                    json.loads(out.splitlines()[-1])["seconds"]
                )
    for n_options in (2, 4):
        fisher, delta = min(results[("fisher", n_options)]), min(results[("delta-loss", n_options)])
        print(
            f"{n_options} options: fisher {fisher:.1f} s, delta-loss {delta:.1f} s, ratio {fisher / delta:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/search_cost.jsonl"))
    parser.add_argument(
        "--sweeps", default=",".join(SWEEPS), help="comma-separated: " + ", ".join(SWEEPS)
    )
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--scorers", action="store_true", help="compare fisher with delta-loss instead"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each case, the fastest kept (1)"
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, n_samples, n_options, dtype, scorer = args.child
        child(model, int(n_samples), int(n_options), dtype, scorer)
    elif args.scorers:
        compare_scorers(args.repeats, 16)
    else:
        if not args.report_only:
            run_cases(
                args.out, args.sweeps.split(","), args.dtypes.split(","), repeats=args.repeats
            )
        report(args.out)


if __name__ == "__main__":
    main()
