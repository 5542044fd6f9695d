"""Side by side with the reference: auto-round's AutoScheme and bitplan on the same model, data,
options and budgets, both plans fake-quantized by the same code and measured by the same evaluator.

    pip install -c constraints.txt -e '.[peer]'        # auto-round, pinned (see docs/RESULTS.md)
    .venv/bin/python benchmarks/vs_autoround.py --repeats 2 --limit 100
    .venv/bin/python benchmarks/vs_autoround.py --model gemma3-270m --out out/vs_autoround-gemma

Phases (``--phases``, default all but ``signround``, in this order; each is resumable: results
already written under ``--out`` are reused, so an interrupted run picks up where it stopped):

``data``
    bitplan's default calibration tokens (16 x 256) are written as text to ``calib.jsonl`` for
    auto-round, one sample per line, each line holding a few tokens more than ``--seq-len`` so
    that auto-round (which drops samples shorter than ``seqlen`` and truncates longer ones)
    keeps every sample. An auto-round child then builds auto-round's own calibration dataloader
    from that file and checks that it holds exactly bitplan's tokens.
``search``
    Each tool's search runs in its own fresh process, alternating bitplan, auto-round, bitplan,
    ... (``--repeats`` rounds), for each option set: MXFP4+MXFP8 at 4.5/5/6 bits and
    W2A16+W4A16 at 3 bits, scale and zero-point bits ignored. bitplan: calibration tokens,
    ``score(..., cache=False)`` and ``solve_plans`` for all budgets of the set. auto-round:
    ``AutoRound(model, scheme=AutoScheme(...), iters=0, ...)`` then ``post_init()`` (which runs
    AutoScheme and fills ``layer_config``), once per budget, all budgets of a set in one process
    sharing one fresh, empty ``AR_AUTO_SCHEME_CACHE`` folder (so its scores are computed once,
    for the first budget, and read back for the others: the reference at its fastest). Timed:
    the search call alone (model loading is timed separately); peak RSS: ``ru_maxrss`` of the
    whole child process. The per-layer choices in auto-round's ``layer_config`` are read back
    into a bitplan plan and its average bits checked against what auto-round logged.
``plans``
    Writes round 0's plans of both tools (and uniform/head/tail baselines) to ``plans/`` and
    checks the read-back bits, and that later rounds chose the same (``plan_checks.json``).
``signround``
    auto-round's whole recipe with tuned rounding, for each budget in its own fresh process:
    ``AutoRound(model, scheme=AutoScheme(...), iters=--signround-iters,
    enable_torch_compile=False, ...)`` then ``quantize()`` (AutoScheme's search, then SignRound
    block by block on the same calibration tokens), timed whole with its peak RSS. The tuned
    (quantize-dequantized) weights of every quantized layer and the per-layer choices are saved
    under ``signround/``. Skipped unless named in ``--phases`` (an hour or more on this CPU).
``eval``
    Every plan (both tools', plus uniform/head/tail baselines) is applied with
    ``bitplan.quantization.apply_plan``; KL(base || quantized) on bitplan's held-out text, and the
    five tasks (``lambada_openai, hellaswag, piqa, winogrande, mmlu``) through lm-eval with
    ``--limit`` (the baselines get KL only). SignRound's models: auto-round's tuned weights
    loaded into the planned layers, activations quantized by bitplan's formats as for every plan.
    With ``--tuned``, bitplan's plans also rounded as ``--rounding tuned`` does (GPTQ + block
    tuning, on the same calibration tokens), measured the same way.
``report``
    Prints the markdown tables (also written to ``results.md`` under ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bitplan.jsonio import write_json_atomic  # stdlib only: cheap to import

#: Option sets: (auto-round option string, budgets in average bits).
OPTION_SETS = {
    "mx": ("MXFP4,MXFP8", (4.5, 5.0, 6.0)),
    "int": ("W2A16,W4A16", (3.0,)),
    # Issue 17's sanity row: every layer W4A16 (one option, so the search is trivial).
    "w4": ("W4A16", (4.0,)),
    # Four options each: how the cost of each tool grows with the number of options.
    "mx4": ("MXFP4,MXFP6,MXFP8,NVFP4", (4.5, 5.0, 6.0)),
    "int4": ("W2A16,W3A16,W4A16,W8A16", (3.0, 4.0, 5.0)),
}
PHASES = ("data", "search", "plans", "signround", "eval", "report")
#: Phases run when --phases is not given (SignRound takes an hour or more).
DEFAULT_PHASES = ("data", "search", "plans", "eval", "report")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
#: Fields of an auto-round scheme that identify which option a layer got.
SCHEME_KEYS = ("bits", "group_size", "sym", "data_type", "act_bits", "act_data_type")
#: Extra tokens after each calibration sample in calib.jsonl (auto-round truncates them away).
TAIL_TOKENS = 32
#: Plan file prefixes of the two tools, and of the per-budget baselines evaluated for KL.
TOOL_FILES = ("bitplan", "autoround")
BASELINE_FILES = ("head", "tail", "unfused")
PIN_HINT = "pip install -c constraints.txt --no-deps auto-round==0.16.1 py-cpuinfo==9.0.0"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_s() -> float:
    """CPU time (user + system, all threads) of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# --------------------------------------------------------------------------------------------
# Children: each runs in its own process and prints one JSON line last.
# --------------------------------------------------------------------------------------------


def model_folder(source: str | None) -> str:
    """The Hugging Face folder of ``--model`` (a bundled model is converted once), which
    auto-round reads."""
    from bitplan.model.bundled import bundled_model

    bundled = bundled_model(source)
    return str(bundled.ensure_folder() if bundled is not None else Path(source).expanduser())


def child_bitplan(
    model: str | None, options: str, budgets: list[float], n_samples: int, seq_len: int
) -> dict:
    """bitplan's search for all budgets of one option set: tokens, scores, plans."""
    start = time.perf_counter()
    from bitplan.data.calibration import calibration_samples
    from bitplan.formats import parse_format_list
    from bitplan.model import load_model
    from bitplan.plans import solve_plans
    from bitplan.scoring import score

    imported = time.perf_counter()
    model = load_model(model)
    loaded = time.perf_counter()
    rss_loaded = peak_rss_mb()

    c0, t0 = cpu_s(), time.perf_counter()
    formats = parse_format_list(options)
    tokens = calibration_samples(model.tokenizer, n_samples=n_samples, seq_len=seq_len)
    t_tokens = time.perf_counter()
    scores = score(model, formats, tokens, cache=False, progress=False)
    t_score = time.perf_counter()
    plans = solve_plans(
        model.layers,
        formats,
        scores,
        budgets,
        model.identity,
        include_head=False,
        include_scales=False,
    )
    t_solve, c1 = time.perf_counter(), cpu_s()
    return {
        "tool": "bitplan",
        "options": options,
        "budgets": budgets,
        "import_s": imported - start,
        "load_s": loaded - imported,
        "search_s": t_solve - t0,
        "search_cpu_s": c1 - c0,
        "tokens_s": t_tokens - t0,
        "score_s": t_score - t_tokens,
        "solve_s": t_solve - t_score,
        "runs": 1,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": peak_rss_mb(),
        "plans": {f"{b:g}": plan.to_dict() for b, plan in zip(budgets, plans, strict=True)},
        "scores": scores.to_dict(),  # for the per-layer (unfused) ablation in ``plans``
    }


class _AvgBitsLog(logging.Handler):
    """Catches auto-round's "AutoScheme final avg_bits: quant layers=..." log record."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("AutoScheme final avg_bits") and record.args:
            avg, target, count, params, bits = record.args[:5]
            self.records.append(
                {
                    "avg_bits": float(avg),
                    "target": float(target),
                    "layers": int(count),
                    "params": int(params),
                    "total_bits": int(bits),
                }
            )


def _match_option(config: dict, option_schemes: dict[str, dict]) -> str | None:
    """The option whose scheme fields all equal the layer's config; None for none."""
    for name, scheme in option_schemes.items():
        if all(config.get(key) == scheme.get(key) for key in SCHEME_KEYS):
            return name
    return None


def _read_choices(
    layer_config: dict, options: str
) -> tuple[dict[str, str], dict[str, dict], list[str]]:
    """auto-round's per-layer configs as (layer -> one of ``options``, unmatched configs,
    unquantized layers)."""
    from dataclasses import asdict

    from auto_round.schemes import preset_name_to_scheme

    option_schemes = {name: asdict(preset_name_to_scheme(name)) for name in options.split(",")}
    choices, unmatched, unquantized = {}, {}, []
    for name, config in layer_config.items():
        option = _match_option(config, option_schemes)
        if option is not None:
            choices[name] = option
        elif config.get("bits", 16) >= 16 and config.get("act_bits", 16) >= 16:
            unquantized.append(name)
        else:
            unmatched[name] = {k: config.get(k) for k in SCHEME_KEYS}
    return choices, unmatched, unquantized


def _autoround(
    model_dir: str,
    options: str,
    bits: float,
    iters: int,
    dataset: str,
    n_samples: int,
    seq_len: int,
    **options_of_autoround,
):
    """auto-round's AutoRound with an AutoScheme for ``bits`` over ``options`` (scale bits
    ignored), on ``dataset``; ``iters`` SignRound steps per block (0: round to nearest)."""
    from auto_round import AutoRound, AutoScheme

    scheme = AutoScheme(
        avg_bits=bits,
        options=options,
        nsamples=n_samples,
        seqlen=seq_len,
        ignore_scale_zp_bits=True,
    )
    return AutoRound(
        model=model_dir,
        scheme=scheme,
        iters=iters,
        dataset=dataset,
        nsamples=n_samples,
        seqlen=seq_len,
        **options_of_autoround,
    )


def child_autoround(
    options: str,
    budgets: list[float],
    n_samples: int,
    seq_len: int,
    dataset: str,
    model_dir: str,
    fresh_cache_per_budget: bool,
) -> dict:
    """auto-round's AutoScheme, one AutoRound object per budget, in this one process."""
    start = time.perf_counter()
    import gc

    import auto_round

    imported = time.perf_counter()
    catcher = _AvgBitsLog()
    logging.getLogger("autoround").addHandler(catcher)
    cache_root = Path(tempfile.mkdtemp(prefix="vs_autoround_cache-"))
    result: dict = {
        "tool": "auto-round",
        "version": auto_round.__version__,
        "options": options,
        "budgets": budgets,
        "import_s": imported - start,
        "runs": len(budgets),
        "per_budget": {},
    }
    try:
        for i, bits in enumerate(budgets):
            cache = cache_root / (f"b{i}" if fresh_cache_per_budget else "shared")
            cache.mkdir(exist_ok=True)
            os.environ["AR_AUTO_SCHEME_CACHE"] = str(cache)
            cached_files = len(list(cache.iterdir()))
            n_logged = len(catcher.records)
            t0 = time.perf_counter()
            ar = _autoround(model_dir, options, bits, 0, dataset, n_samples, seq_len)
            c1, t1 = cpu_s(), time.perf_counter()
            rss_loaded = peak_rss_mb()
            ar.post_init()  # resolves the scheme: runs AutoScheme, fills ar.layer_config
            t2, c2 = time.perf_counter(), cpu_s()
            choices, unmatched, unquantized = _read_choices(ar.layer_config, options)
            logged = catcher.records[n_logged:]
            result["per_budget"][f"{bits:g}"] = {
                "ctor_s": t1 - t0,
                "search_s": t2 - t1,
                "search_cpu_s": c2 - c1,
                "cache_files_before": cached_files,
                "rss_after_ctor_mb": rss_loaded,
                "peak_rss_mb": peak_rss_mb(),
                "choices": choices,
                "unmatched": unmatched,
                "unquantized": unquantized,
                "logged_avg_bits": logged[-1] if logged else None,
            }
            del ar
            gc.collect()
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    per = result["per_budget"].values()
    result["search_s"] = sum(p["search_s"] for p in per)
    result["search_cpu_s"] = sum(p["search_cpu_s"] for p in per)
    result["load_s"] = sum(p["ctor_s"] for p in per)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def child_signround(
    options: str,
    bits: float,
    iters: int,
    n_samples: int,
    seq_len: int,
    dataset: str,
    model_dir: str,
    weights_path: str,
) -> dict:
    """auto-round's AutoScheme then SignRound (``iters`` steps per block) for one budget: its
    whole search + quantization, timed; the tuned weights of its quantized layers saved."""
    import auto_round
    import torch
    from safetensors.torch import save_file

    catcher = _AvgBitsLog()
    logging.getLogger("autoround").addHandler(catcher)
    cache = Path(tempfile.mkdtemp(prefix="vs_autoround_cache-"))
    os.environ["AR_AUTO_SCHEME_CACHE"] = str(cache)  # empty: a cold search, as a user's first
    try:
        c0, t0 = cpu_s(), time.perf_counter()
        # torch.compile off: on this CPU it made one block at iters=200 take over 10 minutes.
        ar = _autoround(
            model_dir,
            options,
            bits,
            iters,
            dataset,
            n_samples,
            seq_len,
            enable_torch_compile=False,
        )
        model, _ = ar.quantize()
        t1, c1 = time.perf_counter(), cpu_s()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    choices, unmatched, unquantized = _read_choices(ar.layer_config, options)
    modules = dict(model.named_modules())
    weights = {
        name: modules[name].weight.detach().to("cpu", torch.float32).contiguous()
        for name in choices
    }
    save_file(weights, weights_path)
    return {
        "tool": "auto-round SignRound",
        "version": auto_round.__version__,
        "options": options,
        "bits": bits,
        "iters": iters,
        "seconds": t1 - t0,
        "cpu_s": c1 - c0,
        "peak_rss_mb": peak_rss_mb(),
        "per_budget": {
            f"{bits:g}": {
                "choices": choices,
                "unmatched": unmatched,
                "unquantized": unquantized,
                "logged_avg_bits": catcher.records[-1] if catcher.records else None,
            }
        },
    }


def child_check_data(
    model_dir: str, tokens_path: str, dataset: str, n_samples: int, seq_len: int
) -> dict:
    """Build auto-round's own calibration dataloader from ``dataset`` (the same call AutoScheme
    makes) and compare its samples with bitplan's tokens."""
    import torch
    from auto_round.calib_dataset import get_dataloader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = torch.load(tokens_path)
    loader = get_dataloader(
        tokenizer, seq_len, dataset_name=dataset, seed=42, bs=8, nsamples=n_samples
    )
    theirs = []
    for batch in loader:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        theirs += [tuple(row.tolist()) for row in ids]
    ours_rows = sorted(tuple(row.tolist()) for row in ours)
    return {
        "bitplan_samples": len(ours_rows),
        "autoround_samples": len(theirs),
        "autoround_lengths": sorted({len(row) for row in theirs}),
        "identical_sets": sorted(theirs) == ours_rows,
    }


# --------------------------------------------------------------------------------------------
# Parent phases
# --------------------------------------------------------------------------------------------


def run_child(kind: str, payload: dict, log: Path) -> dict:
    """Run one child process; its stdout/stderr go to ``log``, its last line is the result."""
    env = dict(os.environ, **OFFLINE_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(payload)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    f_out = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not f_out:
        raise SystemExit(f"{kind} child failed (exit {proc.returncode}); see {log}")
    return json.loads(f_out[-1])


def phase_data(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from bitplan.data.calibration import calibration_samples
    from bitplan.data.text import leading_bos

    out = args.out / "data"
    check_path = out / "data_check.json"
    if check_path.is_file() and not args.force:
        print(f"data: reusing {out}")
        return
    tokenizer = AutoTokenizer.from_pretrained(model_folder(args.model))
    n, length = args.n_samples, args.seq_len
    tokens = calibration_samples(tokenizer, n_samples=n, seq_len=length)
    stream = calibration_samples(tokenizer, n_samples=n + 1, seq_len=length)
    if not torch.equal(stream[:n], tokens):
        raise SystemExit("calibration windows are not a prefix of a longer request")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, out / "calib_tokens.pt")
    lines, mismatched = [], 0
    # A window that starts with BOS is written without it: auto-round's tokenizer adds it back.
    skip = int(leading_bos(tokenizer) is not None)
    for i in range(n):
        ids = tokens[i].tolist()
        text = tokenizer.decode(ids[skip:] + stream[i + 1, skip : skip + TAIL_TOKENS].tolist())
        again = tokenizer(text, truncation=True, max_length=length)["input_ids"]
        mismatched += again != ids
        lines.append(json.dumps({"text": text}))
    (out / "calib.jsonl").write_text("\n".join(lines) + "\n")
    check = run_child(
        "check-data",
        {
            "model_dir": model_folder(args.model),
            "tokens_path": str(out / "calib_tokens.pt"),
            "dataset": str(out / "calib.jsonl"),
            "n_samples": n,
            "seq_len": length,
        },
        out / "check_data.log",
    )
    check["retokenized_mismatches"] = mismatched
    write_json_atomic(check_path, check)
    print(f"data: {n} x {length} tokens -> {out / 'calib.jsonl'}; check: {check}")
    if not check["identical_sets"]:
        raise SystemExit("auto-round would not see bitplan's calibration tokens; see data_check")


def _run_path(args: argparse.Namespace, rep: int, tool: str, set_name: str) -> Path:
    return args.out / "runs" / f"r{rep}_{tool}_{set_name}.json"


def phase_search(args: argparse.Namespace) -> None:
    dataset = str(args.out / "data" / "calib.jsonl")
    for rep in range(args.repeats):
        for set_name in args.sets:
            options, budgets = OPTION_SETS[set_name]
            # Alternate which tool goes first in each round, so that neither always runs on
            # the machine the other has just warmed (file cache) or left loaded.
            order = ("bitplan", "auto-round") if rep % 2 == 0 else ("auto-round", "bitplan")
            for tool in order:
                path = _run_path(args, rep, tool, set_name)
                if path.is_file() and not args.force:
                    continue
                load = os.getloadavg()[0]
                print(f"search r{rep} {set_name} {tool} (load {load:.1f}) ...", flush=True)
                if tool == "bitplan":
                    payload = {
                        "model": args.model,
                        "options": options.lower(),
                        "budgets": list(budgets),
                        "n_samples": args.n_samples,
                        "seq_len": args.seq_len,
                    }
                    result = run_child("bitplan", payload, path.with_suffix(".log"))
                else:
                    payload = {
                        "options": options,
                        "budgets": list(budgets),
                        "n_samples": args.n_samples,
                        "seq_len": args.seq_len,
                        "dataset": dataset,
                        "model_dir": model_folder(args.model),
                        "fresh_cache_per_budget": args.ar_cold_budgets,
                    }
                    result = run_child("autoround", payload, path.with_suffix(".log"))
                result["load_average_before"] = load
                write_json_atomic(path, result)
                print(
                    f"  search {result['search_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB",
                    flush=True,
                )


def autoround_plan(run: dict, bits: str, model) -> tuple[object, dict]:
    """auto-round's choice for one budget as a bitplan Plan, and the bit-accounting check."""
    from bitplan.formats import parse_format
    from bitplan.plans import build_plan

    entry = run["per_budget"][bits]
    table = model.layers
    decoder = table.selected(False)
    fmt_of = {name: parse_format(opt) for name, opt in entry["choices"].items()}
    names = {layer.name for layer in decoder}
    extra = sorted(set(fmt_of) - names)
    missing = sorted(names - set(fmt_of))
    covered = [layer for layer in decoder if layer.name in fmt_of]
    groups: dict[str, set[str]] = {}
    for layer in covered:
        groups.setdefault(layer.group, set()).add(fmt_of[layer.name].name)
    plan = build_plan(
        model.identity,
        "auto-round",
        covered,
        fmt_of,
        options=[parse_format(o).name for o in run["options"].split(",")],
        include_scales=False,
        budget_avg_bits=float(bits),
        group_formats={g: next(iter(f)) for g, f in groups.items() if len(f) == 1},
        scorer="auto-round AutoScheme (delta loss)",
    )
    without = plan.avg_bits_without_scales
    logged = entry["logged_avg_bits"] or {}
    check = {
        "layers_in_plan": len(fmt_of),
        "decoder_layers": len(names),
        "missing_decoder_layers": missing,
        "layers_outside_table": extra,
        "unmatched_configs": entry["unmatched"],
        "unquantized_layers": entry["unquantized"],
        "bitplan_avg_bits": without,
        "autoround_logged_avg_bits": logged.get("avg_bits"),
        "autoround_logged_layers": logged.get("layers"),
        "autoround_logged_params": logged.get("params"),
        "bitplan_params": sum(layer.params for layer in covered),
        "split_fusion_groups": sum(len(f) > 1 for f in groups.values()),
    }
    check["bits_agree"] = (
        logged.get("avg_bits") is not None
        and abs(without - logged["avg_bits"]) < 1e-4
        and logged.get("params") == check["bitplan_params"]
        and not missing
        and not extra
        and not entry["unmatched"]
    )
    return plan, check


def unfused_plans(scores_dict: dict, model, budgets: tuple[float, ...]) -> list:
    """Ablation: bitplan's scores solved per layer, without its fusion groups (q/k/v and
    gate/up sharing one format), i.e. with the freedom AutoScheme's per-layer choice has."""
    from bitplan.formats import parse_format_list
    from bitplan.plans import solve_unfused_plans
    from bitplan.scoring import Scores

    scores = Scores.from_dict(scores_dict)
    formats = parse_format_list(scores.options)
    return solve_unfused_plans(
        model.layers, formats, scores, budgets, model.identity, include_scales=False
    )


def write_plans(args: argparse.Namespace) -> None:
    """Plans of round 0 of both tools into plans/; checks that later rounds chose the same."""
    from bitplan.formats import parse_format_list
    from bitplan.model import load_model
    from bitplan.plans import BUDGETED_RECIPES, Plan, PlanSpace, recipe_plan
    from bitplan.plans.search import budget_label

    model = load_model(args.model)
    model_id = model.identity
    folder = args.out / "plans"
    checks: dict = {}
    for set_name in args.sets:
        options, budgets = OPTION_SETS[set_name]
        formats = parse_format_list(options)
        runs = {
            tool: [
                json.loads(p.read_text())
                for rep in range(args.repeats)
                if (p := _run_path(args, rep, tool, set_name)).is_file()
            ]
            for tool in ("bitplan", "auto-round")
        }
        if not runs["bitplan"] or not runs["auto-round"]:
            continue
        with_scores = [r for r in runs["bitplan"] if "scores" in r]
        if with_scores:
            for bits, plan in zip(
                budgets, unfused_plans(with_scores[0]["scores"], model, budgets), strict=True
            ):
                plan.save(folder / f"unfused_{set_name}_{budget_label(bits)}.json")
        space = PlanSpace.build(model.layers, formats, include_scales=False)
        uniform = recipe_plan(space, "uniform", None, model_id)
        uniform.save(folder / f"uniform_{set_name}.json")
        for bits in budgets:
            key, label = f"{bits:g}", f"{set_name}_{budget_label(bits)}"
            ours = Plan.from_dict(runs["bitplan"][0]["plans"][key])
            ours.save(folder / f"bitplan_{label}.json")
            theirs, check = autoround_plan(runs["auto-round"][0], key, model)
            theirs.save(folder / f"autoround_{label}.json")
            check["bitplan_same_in_all_rounds"] = all(
                r["plans"][key]["layer_formats"] == ours.layer_formats for r in runs["bitplan"]
            )
            check["autoround_same_in_all_rounds"] = all(
                r["per_budget"][key]["choices"]
                == runs["auto-round"][0]["per_budget"][key]["choices"]
                for r in runs["auto-round"]
            )
            check["bitplan_plan_avg_bits"] = ours.avg_bits_without_scales
            checks[label] = check
            for recipe in BUDGETED_RECIPES:
                plan = recipe_plan(space, recipe, bits, model_id)
                plan.save(folder / f"{recipe}_{label}.json")
    write_json_atomic(args.out / "plan_checks.json", checks)
    for label, check in checks.items():
        state = "OK" if check["bits_agree"] else "MISMATCH"
        print(
            f"plan check {label}: auto-round logged {check['autoround_logged_avg_bits']}, "
            f"read back {check['bitplan_avg_bits']:.4f} bits over {check['layers_in_plan']} "
            f"layers -> {state}"
        )


def _signround_path(args: argparse.Namespace, label: str) -> Path:
    return args.out / "signround" / f"i{args.signround_iters}_{label}.json"


def phase_signround(args: argparse.Namespace) -> None:
    """auto-round's AutoScheme + SignRound, each budget in its own process (see the doc)."""
    from bitplan.plans.search import budget_label

    dataset = str(args.out / "data" / "calib.jsonl")
    for set_name in args.sets:
        options, budgets = OPTION_SETS[set_name]
        for bits in budgets:
            path = _signround_path(args, f"{set_name}_{budget_label(bits)}")
            if path.is_file() and not args.force:
                continue
            print(f"signround {path.stem} ...", flush=True)
            payload = {
                "options": options,
                "bits": bits,
                "iters": args.signround_iters,
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
                "dataset": dataset,
                "model_dir": model_folder(args.model),
                "weights_path": str(path.with_suffix(".safetensors")),
            }
            result = run_child("signround", payload, path.with_suffix(".log"))
            write_json_atomic(path, result)
            print(
                f"  {result['seconds']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True
            )


def signround_model(model, result: dict, weights_path: Path):
    """The fake-quantized model of a SignRound run: auto-round's plan applied by bitplan (which
    quantizes activations where the format does), each planned layer's weight replaced by
    auto-round's tuned one. Also how far those weights are from bitplan's own grid (0 where
    re-rounding them changes nothing, as for MX's power-of-two scales)."""
    import torch
    from safetensors.torch import load_file

    from bitplan.quantization import apply_plan

    bits = next(iter(result["per_budget"]))
    plan, check = autoround_plan(result, bits, model)
    quantized = apply_plan(model.module, plan)
    tuned = load_file(str(weights_path))
    modules = dict(quantized.named_modules())
    off_grid = 0.0
    with torch.no_grad():
        for name, weight in tuned.items():
            layer = modules[name]
            off_grid = max(
                off_grid, (layer.fmt.quantize_weight(weight) - weight).abs().max().item()
            )
            layer.weight.copy_(weight.to(layer.weight.dtype))
    return quantized, {**check, "off_bitplan_grid_max": off_grid}


def phase_eval(args: argparse.Namespace) -> None:
    """KL of the two tools' plans, then their task accuracy (and the base model's), then the
    baselines' KL: the comparison first, the context after."""
    import torch

    from bitplan.data.calibration import calibration_samples
    from bitplan.data.heldout import heldout_samples
    from bitplan.evaluation.divergence import BaseLogits
    from bitplan.evaluation.harness import evaluate_tasks
    from bitplan.model import load_model
    from bitplan.plans import Plan
    from bitplan.plans.search import budget_label
    from bitplan.quantization import apply_plan
    from bitplan.quantization.sequential import quantize_model

    torch.manual_seed(0)
    model = load_model(args.model)
    folder, out = args.out / "plans", args.out / "eval"
    out.mkdir(parents=True, exist_ok=True)
    labels = [
        f"{set_name}_{budget_label(bits)}"
        for set_name in args.sets
        for bits in OPTION_SETS[set_name][1]
    ]
    tools = [folder / f"{tool}_{label}.json" for label in labels for tool in TOOL_FILES]
    tools = [p for p in tools if p.is_file()]
    baselines = [folder / f"{recipe}_{label}.json" for label in labels for recipe in BASELINE_FILES]
    baselines += [folder / f"uniform_{set_name}.json" for set_name in args.sets]
    baselines = [p for p in baselines if p.is_file()]
    base_path = out / "base_logits.safetensors"
    base = None

    def measure(stem: str, quantize, tasks: bool = True) -> None:
        """KL of the model ``quantize()`` returns (with facts to record) into kl_{stem}.json,
        and with ``--limit`` (and ``tasks``) its task accuracy into tasks_{stem}_limit*.json;
        the model is built once, and only if one of them is missing."""
        nonlocal base
        kl_path = out / f"kl_{stem}.json"
        task_path = out / f"tasks_{stem}_limit{args.limit}.json"
        need_kl = args.force or not kl_path.is_file()
        need_tasks = tasks and args.limit > 0 and (args.force or not task_path.is_file())
        if not (need_kl or need_tasks):
            return
        quantized, facts = quantize()
        if need_kl:
            if base is None:
                if base_path.is_file():
                    base = BaseLogits.load(base_path)
                else:
                    tokens = heldout_samples(
                        model.tokenizer, args.heldout_samples, args.heldout_len
                    )
                    base = BaseLogits.compute(model.module, tokens)
                    base.save(base_path)
            start = time.perf_counter()
            div = base.compare(quantized)
            write_json_atomic(
                kl_path, {**div.to_dict(), "seconds": time.perf_counter() - start, **facts}
            )
            print(f"eval KL {stem}: {div.kl:.4f}", flush=True)
        if need_tasks:
            print(f"eval tasks {stem} (limit {args.limit}) ...", flush=True)
            results = evaluate_tasks(
                quantized, model.tokenizer, limit=args.limit, batch_size=args.eval_batch_size
            )
            results.save(task_path)
            print(f"  average acc {results.average:.4f} in {results.seconds:.0f} s", flush=True)

    def planned(path: Path):
        return lambda: (apply_plan(model.module, Plan.load(path)), {})

    def signround(path: Path):
        def quantize():
            result = json.loads(path.read_text())
            weights = path.with_suffix(".safetensors")
            quantized, check = signround_model(model, result, weights)
            return quantized, {"plan_check": check}

        return quantize

    def tuned(path: Path):
        def quantize():
            tokens = calibration_samples(model.tokenizer, args.n_samples, args.seq_len)
            start = time.perf_counter()
            quantized = quantize_model(model.module, Plan.load(path), "tuned", tokens)
            return quantized, {"rounding_s": time.perf_counter() - start}

        return quantize

    measure("base", lambda: (model.module, {}))  # KL 0: a check of the evaluator
    for path in tools:
        measure(path.stem, planned(path))
    for path in sorted((args.out / "signround").glob(f"i{args.signround_iters}_*.json")):
        measure(f"signround_{path.stem}", signround(path))
    if args.tuned:
        for path in tools:
            if path.stem.startswith("bitplan_"):
                measure(f"tuned_{path.stem}", tuned(path))
    for path in baselines:
        measure(path.stem, planned(path), tasks=False)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _avg_acc(tasks: dict | None) -> tuple[float, float] | None:
    """Mean acc over the tasks and its standard error (tasks taken as independent)."""
    if tasks is None:
        return None
    scores = tasks["tasks"].values()
    mean = sum(s["acc"] for s in scores) / len(scores)
    se = math.sqrt(sum((s["acc_stderr"] or 0.0) ** 2 for s in scores)) / len(scores)
    return mean, se


def _fmt_acc(acc: tuple[float, float] | None) -> str:
    return "-" if acc is None else f"{acc[0]:.4f} ± {acc[1]:.4f}"


def phase_report(args: argparse.Namespace) -> str:
    from bitplan.plans.search import budget_label

    lines: list[str] = []
    checks = _load(args.out / "plan_checks.json") or {}
    ev = args.out / "eval"
    limit = args.limit
    versions = _load(args.out / "versions.json") or {}
    lines.append(
        f"bitplan {versions.get('bitplan', '?')}, auto-round {versions.get('auto_round', '?')}, "
        f"torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}, "
        f"lm-eval {versions.get('lm_eval', '?')}; {versions.get('machine', '')}"
    )
    lines.append(
        f"calibration: {args.n_samples} x {args.seq_len} tokens (bitplan's default text, the same "
        f"tokens for both); held-out KL: {args.heldout_samples} x {args.heldout_len} tokens; "
        f"tasks: lm-eval, limit {limit} per task (per MMLU subject)"
    )
    lines.append("")
    base_tasks = _load(ev / f"tasks_base_limit{limit}.json")
    lines.append(f"Unquantized model: average accuracy {_fmt_acc(_avg_acc(base_tasks))}")
    lines.append("")
    lines.append("### Quality: KL(base || quantized) on held-out text and average task accuracy")
    lines.append("")
    lines.append(
        "| options | avg bits | bitplan bits | auto-round bits | bitplan KL | auto-round KL "
        "| KL ratio | bitplan acc | auto-round acc | acc diff (± se) |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for set_name in args.sets:
        options, budgets = OPTION_SETS[set_name]
        for bits in budgets:
            label = f"{set_name}_{budget_label(bits)}"
            ours, theirs = (_load(ev / f"kl_{t}_{label}.json") for t in ("bitplan", "autoround"))
            acc_o, acc_t = (
                _avg_acc(_load(ev / f"tasks_{t}_{label}_limit{limit}.json"))
                for t in ("bitplan", "autoround")
            )
            check = checks.get(label, {})
            ratio = f"{ours['kl'] / theirs['kl']:.2f}" if ours and theirs else "-"
            diff = "-"
            if acc_o and acc_t:
                se = math.hypot(acc_o[1], acc_t[1])
                diff = f"{acc_o[0] - acc_t[0]:+.4f} ± {se:.4f}"
            lines.append(
                f"| {options.replace(',', '+')} | {bits:g} "
                f"| {check.get('bitplan_plan_avg_bits', float('nan')):.4f} "
                f"| {check.get('bitplan_avg_bits', float('nan')):.4f} "
                f"| {ours['kl'] if ours else float('nan'):.4f} "
                f"| {theirs['kl'] if theirs else float('nan'):.4f} | {ratio} "
                f"| {_fmt_acc(acc_o)} | {_fmt_acc(acc_t)} | {diff} |"
            )
    lines.append("")
    signround_rows = []
    for set_name in args.sets:
        options, budgets = OPTION_SETS[set_name]
        for bits in budgets:
            label = f"{set_name}_{budget_label(bits)}"
            path = _signround_path(args, label)
            run, kl_sr = _load(path), _load(ev / f"kl_signround_{path.stem}.json")
            rtn = _load(ev / f"kl_autoround_{label}.json")
            if run and kl_sr:
                signround_rows.append(
                    f"| {options.replace(',', '+')} | {bits:g} "
                    f"| {rtn['kl'] if rtn else float('nan'):.4f} | {kl_sr['kl']:.4f} "
                    f"| {kl_sr['ppl']:.2f} | {run['seconds']:.0f} | {run['peak_rss_mb']:.0f} "
                    f"| {kl_sr['plan_check']['off_bitplan_grid_max']:.2g} |"
                )
    if signround_rows:
        lines.append(
            f"### auto-round with tuned rounding: AutoScheme + SignRound "
            f"(iters={args.signround_iters})"
        )
        lines.append("")
        lines.append(
            "| options | avg bits | AutoScheme + RTN KL | AutoScheme + SignRound KL | ppl "
            "| search + quantize s | peak RSS MB | tuned weights off bitplan's grid (max) |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        lines += signround_rows + [""]
    tuned_rows = []
    for set_name in args.sets:
        options, budgets = OPTION_SETS[set_name]
        for bits in budgets:
            label = f"{set_name}_{budget_label(bits)}"
            stem = _signround_path(args, label).stem
            cells = {
                name: (
                    _load(ev / f"kl_{name}.json"),
                    _avg_acc(_load(ev / f"tasks_{name}_limit{limit}.json")),
                )
                for name in (
                    f"bitplan_{label}",
                    f"tuned_bitplan_{label}",
                    f"autoround_{label}",
                    f"signround_{stem}",
                )
            }
            kl_ours, kl_sr = cells[f"tuned_bitplan_{label}"][0], cells[f"signround_{stem}"][0]
            if kl_ours is None:
                continue
            ratio = f"{kl_ours['kl'] / kl_sr['kl']:.2f}" if kl_sr else "-"
            tuned_rows.append(
                f"| {options.replace(',', '+')} | {bits:g} | "
                + " | ".join(
                    f"{kl['kl']:.4f} / {_fmt_acc(acc)}" if kl else "-" for kl, acc in cells.values()
                )
                + f" | {ratio} | {kl_ours['rounding_s']:.0f} |"
            )
    if tuned_rows:
        lines.append("### Rounded to nearest and tuned, both tools: KL / average accuracy (± se)")
        lines.append("")
        lines.append(
            "| options | avg bits | bitplan plan + RTN | bitplan plan + tuned "
            f"| AutoScheme + RTN | AutoScheme + SignRound (iters={args.signround_iters}) "
            "| KL: bitplan tuned / SignRound | bitplan GPTQ + tuning s |"
        )
        lines.append("|---|---:|---|---|---|---|---:|---:|")
        lines += tuned_rows + [""]
    lines.append("### Baselines and an ablation (KL only; same evaluator)")
    lines.append("")
    lines.append(
        "| options | avg bits | uniform (cheapest) | head (high precision near lm_head) "
        "| tail (near the embedding) | bitplan per layer, no fusion groups |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|")
    for set_name in args.sets:
        options, budgets = OPTION_SETS[set_name]
        uni = _load(ev / f"kl_uniform_{set_name}.json")
        for bits in budgets:
            label = f"{set_name}_{budget_label(bits)}"
            cells = [uni] + [_load(ev / f"kl_{r}_{label}.json") for r in BASELINE_FILES]
            lines.append(
                f"| {options.replace(',', '+')} | {bits:g} | "
                + " | ".join(f"{c['kl']:.4f}" if c else "-" for c in cells)
                + " |"
            )
    lines.append("")
    lines.append(
        "### Cost of the search: wall time (s) and peak RSS (MB); best (minimum) of the rounds, "
        "every round listed; each tool in its own process, alternating"
    )
    lines.append("")
    lines.append(
        "| options | tool | runs | search s, all budgets: best (rounds) | breakdown (best round) "
        "| CPU s: best (rounds) | model load s | peak RSS MB: best (rounds) | load avg before |"
    )
    lines.append("|---|---|---:|---:|---|---:|---:|---:|---|")
    ratios = []
    for set_name in args.sets:
        options, budgets = OPTION_SETS[set_name]
        runs = {
            tool: [
                r
                for rep in range(args.repeats)
                if (r := _load(_run_path(args, rep, tool, set_name)))
            ]
            for tool in ("bitplan", "auto-round")
        }
        best = {}
        for tool, rs in runs.items():
            if not rs:
                continue
            fast = min(rs, key=lambda r: r["search_s"])
            rss = min(r["peak_rss_mb"] for r in rs)
            if tool == "bitplan":
                per = (
                    f"tokens {fast['tokens_s']:.1f} + score {fast['score_s']:.1f} + solve "
                    f"{fast['solve_s']:.2f} ({len(budgets)} budgets)"
                )
                first = fast["search_s"]
            else:
                per = ", ".join(
                    f"{b:g} bits: {fast['per_budget'][f'{b:g}']['search_s']:.1f}" for b in budgets
                )
                first = min(r["per_budget"][f"{budgets[0]:g}"]["search_s"] for r in rs)
            cpus = [r["search_cpu_s"] for r in rs if "search_cpu_s" in r]
            cpu = min(cpus) if cpus else float("nan")
            best[tool] = (fast["search_s"], rss, first, cpu)
            all_s = ", ".join(f"{r['search_s']:.0f}" for r in rs)
            all_c = ", ".join(
                f"{r['search_cpu_s']:.0f}" if "search_cpu_s" in r else "-" for r in rs
            )
            all_m = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in rs)
            loads = ", ".join(f"{r.get('load_average_before', float('nan')):.1f}" for r in rs)
            lines.append(
                f"| {options.replace(',', '+')} | {tool} | {rs[0]['runs']} "
                f"| {fast['search_s']:.0f} ({all_s}) | {per} | {cpu:.0f} ({all_c}) "
                f"| {fast['load_s']:.1f} "
                f"| {rss:.0f} ({all_m}) | {loads} |"
            )
        if len(best) == 2:
            ratios.append(
                (
                    options,
                    best["bitplan"][0] / best["auto-round"][0],
                    best["bitplan"][0] / best["auto-round"][2],
                    best["bitplan"][1] / best["auto-round"][1],
                    best["bitplan"][3] / best["auto-round"][3],
                )
            )
    lines.append("")
    lines.append(
        "| options | time: bitplan / auto-round (all budgets) | time: bitplan (all budgets) / "
        "one cold auto-round budget | CPU time: bitplan / auto-round | peak RSS: bitplan / "
        "auto-round |"
    )
    lines.append("|---|---:|---:|---:|---:|")
    for options, t_all, t_first, m, c in ratios:
        lines.append(
            f"| {options.replace(',', '+')} | {t_all:.2f} | {t_first:.2f} | {c:.2f} | {m:.2f} |"
        )
    lines.append("")
    lines.append("### Check: auto-round's plan read back into bitplan")
    lines.append("")
    lines.append(
        "| options @ bits | layers | auto-round logged avg bits | read back (bitplan accounting) "
        "| params equal | fusion groups split | same in all rounds (bitplan / auto-round) |"
    )
    lines.append("|---|---:|---:|---:|---|---:|---|")
    for label, c in checks.items():
        lines.append(
            f"| {label} | {c['layers_in_plan']}/{c['decoder_layers']} "
            f"| {c['autoround_logged_avg_bits']} | {c['bitplan_avg_bits']:.4f} "
            f"| {c['autoround_logged_params'] == c['bitplan_params']} "
            f"| {c['split_fusion_groups']} "
            f"| {c['bitplan_same_in_all_rounds']} / {c['autoround_same_in_all_rounds']} |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)
    return text


def record_versions(args: argparse.Namespace) -> None:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    info = {
        "date": date.today().isoformat(),
        "bitplan": f"{version('bitplan')} (git {git or '?'})",
        "auto_round": version("auto-round"),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "lm_eval": version("lm_eval"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    write_json_atomic(args.out / "versions.json", info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/vs_autoround"),
        help="working folder (default: out/vs_autoround, git-ignored)",
    )
    parser.add_argument(
        "--model", help="bundled model key or folder (default: the embedded default)"
    )
    parser.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help=f"comma-separated, from {','.join(PHASES)} (default: all but signround)",
    )
    parser.add_argument(
        "--signround-iters",
        type=int,
        default=50,
        help="SignRound steps per block for the signround phase (50: auto-round's light setting)",
    )
    parser.add_argument(
        "--sets",
        default="mx,int",
        help="option sets: mx (MXFP4+MXFP8 at 4.5/5/6) and/or int (W2A16+W4A16 at 3)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of searches (2)")
    parser.add_argument("--n-samples", type=int, default=16, help="calibration samples (16)")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration tokens each (256)")
    parser.add_argument(
        "--limit",
        type=int,
        default=100,
        help="lm-eval documents per task / per MMLU subject (100); 0 skips task accuracy",
    )
    parser.add_argument("--eval-batch-size", type=int, default=8, help="lm-eval batch size (8)")
    parser.add_argument("--heldout-samples", type=int, default=8, help="held-out sequences (8)")
    parser.add_argument("--heldout-len", type=int, default=512, help="held-out tokens each (512)")
    parser.add_argument(
        "--ar-cold-budgets",
        action="store_true",
        help="give every auto-round budget its own empty score cache (each then scores anew); "
        "default: one fresh cache per option set, shared by its budgets",
    )
    parser.add_argument(
        "--tuned",
        action="store_true",
        help="eval also measures bitplan's plans with --rounding tuned (GPTQ + block tuning on "
        "the same calibration tokens)",
    )
    parser.add_argument("--force", action="store_true", help="redo results already in --out")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        os.environ.update(OFFLINE_ENV)
        kind, payload = args.child[0], json.loads(args.child[1])
        func = {
            "bitplan": child_bitplan,
            "autoround": child_autoround,
            "check-data": child_check_data,
            "signround": child_signround,
        }[kind]
        print(json.dumps(func(**payload)), flush=True)
        return 0

    os.environ.update(OFFLINE_ENV)
    args.sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in args.sets if s not in OPTION_SETS]
    phases = [p for p in args.phases.split(",") if p]
    if unknown or any(p not in PHASES for p in phases):
        parser.error(f"--sets from {list(OPTION_SETS)}, --phases from {list(PHASES)}")
    import importlib.util

    if {"data", "search", "signround"} & set(phases) and importlib.util.find_spec(
        "auto_round"
    ) is None:
        print(f"auto-round is not installed; install the peer group: {PIN_HINT}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if {"data", "search"} & set(phases):
        record_versions(args)
    for phase in phases:
        {
            "data": phase_data,
            "search": phase_search,
            "plans": write_plans,
            "signround": phase_signround,
            "eval": phase_eval,
            "report": phase_report,
        }[phase](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
