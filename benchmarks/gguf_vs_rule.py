"""bitplan's GGUF plans against llama.cpp's own mixes at the same file size, measured in llama.cpp.

On the embedded default (SmolLM2-135M-Instruct), for each llama.cpp mix (Q4_K_M; Q3_K_M):

* the mix itself, as llama.cpp's rules choose it (``bitplan/plans/recipes.py``; checked
  here byte for byte against ``llama_model_quantize`` run on an F32 file of the same model);
* bitplan's plan over the same GGUF types, solved per tensor from Fisher scores on the default
  calibration text, at the mix's own average bits (so the file is no larger);
* uniform files of the lowest and the highest type.

Every file is written by ``export_model`` and run by llama.cpp (llama-cpp-python): KL divergence
and perplexity on held-out text are computed from llama.cpp's logits, against llama.cpp running
the unquantized model (an F32 file). As a check of the export, the files of bitplan's plan and of
the uniform high type are also compared with bitplan's own fake-quantized model of the same
plan, with and without llama.cpp's activation rounding emulated.

    .venv/bin/python benchmarks/gguf_vs_rule.py [--mixes Q4_K_M,Q3_K_M] [--imatrix] [--model M]

``--model gemma3-270m`` runs it on Gemma-3-270M, written as llama.cpp's ``gemma3``
(docs/GGUF.md, "Architectures"; its Q4_K_M export is checked there, this script is not yet run
on it).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import gguf
import numpy as np

from bitplan.data.calibration import calibration_samples
from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.evaluation.llama_cpp import LlamaCppModel
from bitplan.exporters import export_model
from bitplan.model import load_model
from bitplan.plans import (
    llama_cpp_mix_plan,
    mix_tensor_types,
    solve_gguf_plans,
    uniform_gguf_plan,
)
from bitplan.quantization.gguf import fake_quantize_gguf
from bitplan.scoring import score
from bitplan.scoring.importance import collect_importance

#: llama.cpp mix -> the GGUF types bitplan chooses among (the mix's own types).
COMPARISONS = {"Q4_K_M": ["q4_k", "q6_k"], "Q3_K_M": ["q3_k", "q4_k", "q5_k"]}


def llama_cpp_quantize(source: Path, target: Path, mix: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {mix}")


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors with equal type and bytes, tensors) of two GGUF files."""
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    equal = sum(
        1
        for name, t in ta.items()
        if name in tb
        and t.tensor_type == tb[name].tensor_type
        and np.array_equal(np.array(t.data), np.array(tb[name].data))
    )
    return equal, len(ta)


def export_check(model, plan, path: Path, heldout, embedding_type, output_type, threads) -> dict:
    """How llama.cpp running ``path`` compares with bitplan's fake-quantized model of ``plan``:
    pointwise, and against the unquantized torch model with and without llama.cpp's activation
    rounding emulated."""
    base = BaseLogits.compute(model.module, heldout)
    runner = LlamaCppModel(path, n_ctx=heldout.shape[1], n_threads=threads)
    result = {"llama.cpp": base.compare(runner, batch_size=1)}
    for label, emulate in (("weights only", False), ("weights + activation rounding", True)):
        fake = fake_quantize_gguf(model, plan, embedding_type, output_type, None, emulate)
        result[label] = base.compare(fake)
        if not emulate:
            fake_logits = BaseLogits.compute(fake, heldout)
            result["fake vs llama.cpp"] = fake_logits.compare(runner, batch_size=1)
            del fake_logits
        del fake
        gc.collect()
    runner.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundled model key or folder (default: embedded default)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/bitplan-gguf"))
    parser.add_argument("--mixes", default="Q4_K_M")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--heldout-samples", type=int, default=8)
    parser.add_argument("--heldout-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--imatrix", action="store_true", help="also with importance matrices")
    args = parser.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model = load_model(args.model)
    model_id = model.identity
    calib = calibration_samples(model.tokenizer, args.calib_samples, args.calib_len)
    heldout = heldout_samples(model.tokenizer, args.heldout_samples, args.heldout_len)
    n_ctx = args.heldout_len
    mixes = args.mixes.split(",")
    importance = collect_importance(model, calib, include_head=False) if args.imatrix else None

    # The unquantized model as llama.cpp runs it: the base of every KL below.
    f32_plan = uniform_gguf_plan(model, "f32", model_id)
    f32_path = out / "f32.gguf"
    export_model(
        model, f32_plan, f32_path, "gguf", force=True, embedding_type="f32", output_type="f32"
    )

    files: list[tuple[str, str, Path, object]] = []  # (mix, label, path, report)
    checks: dict[str, str] = {}
    emulation: dict[str, dict] = {}
    for mix in mixes:
        options = COMPARISONS[mix]
        scores = score(model, options, calib, scorer="fisher")
        print(f"scores: {len(scores.layer_scores)} layers x {options} in {scores.seconds:.0f} s")
        embedding_type, output_type = mix_tensor_types(mix)
        rule = llama_cpp_mix_plan(model, mix, model_id)
        low, high = options[0], options[-1]
        ours = solve_gguf_plans(model, options, scores, [rule.avg_bits], model_id)[0]
        plans = [
            (f"uniform {low}", uniform_gguf_plan(model, low, model_id)),
            (f"llama.cpp {mix} (rule)", rule),
            (f"bitplan {','.join(options)}", ours),
            (f"uniform {high}", uniform_gguf_plan(model, high, model_id)),
        ]
        variants = [("", None)] + ([(" + imatrix", importance)] if importance else [])
        for suffix, imp in variants:
            for label, plan in plans:
                if imp is not None and label.startswith("uniform"):
                    continue
                name = label.split()[0] + "-" + label.split()[1].replace(",", "_")
                path = out / f"{mix}-{name}{'-imatrix' if imp else ''}.gguf"
                report = export_model(
                    model,
                    plan,
                    path,
                    "gguf",
                    force=True,
                    embedding_type=embedding_type,
                    output_type=output_type,
                    importance=imp,
                )
                files.append((mix, label + suffix, path, report))
                print(report.summary())
                if imp is None and label.startswith(("bitplan", f"uniform {high}")):
                    emulation[f"{mix} {label}"] = export_check(
                        model, plan, path, heldout, embedding_type, output_type, args.threads
                    )
        theirs = out / f"{mix}-llama-quantize.gguf"
        llama_cpp_quantize(f32_path, theirs, mix)
        rule_path = next(p for m, lab, p, _ in files if m == mix and lab.endswith("(rule)"))
        equal, total = same_tensors(rule_path, theirs)
        checks[mix] = f"{equal}/{total} tensors byte-identical to llama_model_quantize {mix}"
        print(checks[mix])

    runner = LlamaCppModel(f32_path, n_ctx=n_ctx, n_threads=args.threads)
    base = BaseLogits.compute(runner, heldout, batch_size=1)
    runner.close()
    torch_check = base.compare(model.module)
    checks["torch vs llama.cpp F32"] = (
        f"KL(llama.cpp F32 || bitplan's torch model): {torch_check.kl:.2e}; ppl llama.cpp F32 "
        f"{base.base_ppl:.4f}, torch {torch_check.ppl:.4f}"
    )
    rows = []
    for mix, label, path, report in files:
        runner = LlamaCppModel(path, n_ctx=n_ctx, n_threads=args.threads)
        result = base.compare(runner, batch_size=1)
        runner.close()
        rows.append(
            {
                "mix": mix,
                "recipe": label,
                "file_bytes": report.file_bytes,
                "tensor_bytes": report.tensor_bytes,
                "bpw_file": report.bits_per_weight,
                "bpw_layers": report.planned_bits_per_weight,
                "kl": result.kl,
                "top1": result.top1_agreement,
                "ppl": result.ppl,
                "types": report.type_counts,
            }
        )
        print(json.dumps(rows[-1]))
    print()
    print(f"base (llama.cpp, F32): perplexity {base.base_ppl:.4f} on {base.num_predictions} tokens")
    print("| mix | recipe | file MiB | bpw (file) | bpw (layers) | KL (nats/token) | top-1 | ppl |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mix']} | {r['recipe']} | {r['file_bytes'] / 2**20:.2f} | {r['bpw_file']:.4f} "
            f"| {r['bpw_layers']:.4f} | {r['kl']:.5f} | {r['top1']:.4f} | {r['ppl']:.3f} |"
        )
    print()
    print(
        "| plan | weights only (torch) | + activation rounding (torch) | llama.cpp | fake vs llama.cpp |"
    )
    print("|---|---|---|---|---|")
    for label, result in emulation.items():
        cells = [
            f"KL {result[key].kl:.5f}, ppl {result[key].ppl:.3f}"
            for key in ("weights only", "weights + activation rounding", "llama.cpp")
        ]
        pointwise = result["fake vs llama.cpp"]
        cells.append(f"KL {pointwise.kl:.2e}, top-1 {pointwise.top1_agreement:.4f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for key, line in checks.items():
        print(f"- {key}: {line}")
    summary = {
        "rows": rows,
        "checks": checks,
        "emulation": {k: {n: d.to_dict() for n, d in v.items()} for k, v in emulation.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
