"""bitplan's GGUF plans against llama.cpp's own mixes at the same file size, measured in llama.cpp.

For each llama.cpp mix (``--mixes all``: every mix ``bitplan/plans/recipes.py`` reproduces):

* the mix itself, as llama.cpp's rules choose it (checked here byte for byte against
  ``llama_model_quantize`` run on an F32 file of the same model, where llama.cpp can quantize
  the mix without an importance matrix);
* bitplan's plan, solved per tensor from Fisher scores (``--scorer``) on the default
  calibration text over ``--options`` (default ``gguf-all``: every llama.cpp type, those that
  need an importance matrix included unless ``--no-imatrix``; or ``mix``: the types the mix
  itself uses), the scores computed with the same importance matrix, at the mix's own average
  bits over the decoder layers, with the mix's token-embedding and output types (so the two
  files have the same tensor bytes up to the choice, and bitplan's is never larger);

both written with an importance matrix collected on the calibration tokens (``--no-imatrix``:
without), as ``llama-quantize --imatrix`` uses it. ``--with-head`` adds a third file per mix:
bitplan's plan with the output tensor (and the token embedding tied to it) as one more choice of
the plan (``bitplan search --quantize-head --target-size``), at the rule's whole file size.
``--untie`` gives the output its own copy of a tied table, so that the file stores an untied
token embedding, which the plan with the head then chooses too (plus a row with it held to the
mix's type: what the choice adds). ``--front 3,4,5`` adds bitplan plans at
those budgets, for the curve of KL against size. Every KL, top-1 agreement and perplexity is
computed from llama.cpp's logits (llama-cpp-python) on held-out text, against llama.cpp running
the unquantized model (an F32 file). Results go to ``OUT/results.json`` as each file is measured;
a second run resumes; ``--plot FILE`` draws KL against file size.

    .venv/bin/python benchmarks/gguf_vs_rule.py [--model gemma3-270m] [--mixes all] \\
        [--options gguf-all|mix] [--front 3,4,5,6] [--plot docs/gguf_vs_rule.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import gguf
import numpy as np
import torch

import bitplan
from bitplan.data.calibration import calibration_samples
from bitplan.data.heldout import heldout_samples
from bitplan.errors import BitplanError
from bitplan.evaluation.divergence import BaseLogits
from bitplan.evaluation.llama_cpp import LlamaCppModel
from bitplan.exporters import export_model
from bitplan.formats import parse_format_list
from bitplan.model import load_model
from bitplan.plans import (
    LLAMA_CPP_MIXES,
    llama_cpp_mix_plan,
    mix_tensor_types,
    solve_gguf_plans,
    uniform_gguf_plan,
)
from bitplan.plans.measured import check_tokens, least_divergent
from bitplan.scoring import DEFAULT_SCORER, SCORERS, score
from bitplan.scoring.importance import collect_importance

#: The mix whose embedding and output types the ``--front`` files get.
FRONT_TYPES_OF = "Q4_K_M"


def llama_cpp_quantize(source: Path, target: Path, mix: str) -> bool:
    """llama.cpp's own ``mix`` of the F32 file ``source``; False where llama.cpp refuses (a mix
    that needs an importance matrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = 2
    try:
        return (
            llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) == 0
        )
    except Exception:  # llama.cpp throws through the C API for "requires an imatrix"
        return False


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


def untied(model):
    """``model`` with its output head given its own copy of the tied embedding table: the same
    values, stored twice, as in a model trained untied (most from 1B up)."""
    module = model.module
    head = module.get_output_embeddings()
    if head.weight is not module.get_input_embeddings().weight:
        raise SystemExit(f"{model.name} is untied already; drop --untie")
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    module.config.tie_word_embeddings = False
    return dataclasses.replace(model, name=f"{model.name}-untied")


def mix_options(mix: str, model) -> list[str]:
    """The types llama.cpp's ``mix`` uses in the decoder layers (before fallback)."""
    return sorted(set(llama_cpp_mix_plan(model, mix, "probe").layer_formats.values()))


class Results:
    """results.json: one row per measured file, written after each."""

    def __init__(self, path: Path, setting: dict) -> None:
        self.path = path
        self.data = {"setting": setting, "rows": {}, "checks": {}}
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("setting") != setting:
                raise SystemExit(f"{path} holds another setting; choose another --out-dir")
            self.data = previous

    def has(self, key: str) -> bool:
        return key in self.data["rows"]

    def add(self, key: str, row: dict) -> None:
        self.data["rows"][key] = row
        self.save()

    def check(self, key: str, line: str) -> None:
        self.data["checks"][key] = line
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundled model key or folder (default: embedded default)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/bitplan-gguf"))
    parser.add_argument("--mixes", default="all", help="comma-separated mixes, or all")
    parser.add_argument("--options", default="gguf-all", help="gguf-all, mix, or a format list")
    parser.add_argument("--front", default="", help="extra bitplan budgets (bits per weight)")
    parser.add_argument("--no-imatrix", action="store_true")
    parser.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        choices=SCORERS,
        help="estimator of bitplan's plans (default: %(default)s)",
    )
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--heldout-samples", type=int, default=8)
    parser.add_argument("--heldout-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, help="draw KL against file size into this PNG")
    parser.add_argument(
        "--with-head",
        action="store_true",
        help="also measure bitplan's plan with the output (and a tied embedding) in the plan, at "
        "the rule's whole file size",
    )
    parser.add_argument(
        "--untie",
        action="store_true",
        help="give the output head its own copy of a tied embedding table (values unchanged), "
        "so that the file stores the two apart and, with --with-head, the token embedding is a "
        "choice of its own; adds a row with the embedding pinned to the rule's type",
    )
    parser.add_argument(
        "--like",
        action="store_true",
        help="also measure `bitplan search --like MIX`: bitplan's plan or the mix, whichever "
        "diverges less on calibration windows the scores did not use",
    )
    args = parser.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mixes = list(LLAMA_CPP_MIXES) if args.mixes == "all" else args.mixes.split(",")
    front = [float(b) for b in args.front.split(",") if b]

    model = load_model(args.model)
    if args.untie:
        model = untied(model)
    model_id = model.identity
    setting = {
        "model": model_id,
        **({"untied": True} if args.untie else {}),
        "options": args.options,
        "imatrix": not args.no_imatrix,  # in the files and in the scores
        **({"scorer": args.scorer} if args.scorer != "fisher" else {}),  # old results resume
        "calib": [args.calib_samples, args.calib_len],
        "heldout": [args.heldout_samples, args.heldout_len],
    }
    results = Results(out / "results.json", setting)
    calib = calibration_samples(model.tokenizer, args.calib_samples, args.calib_len)
    heldout = heldout_samples(model.tokenizer, args.heldout_samples, args.heldout_len)
    importance = None if args.no_imatrix else collect_importance(model, calib, include_head=False)

    # The unquantized model as llama.cpp runs it: the base of every KL below.
    f32_path = out / "f32.gguf"
    if not f32_path.is_file():
        f32 = uniform_gguf_plan(model, "f32", model_id)
        export_model(model, f32, f32_path, "gguf", embedding_type="f32", output_type="f32")
    runner = LlamaCppModel(f32_path, n_ctx=args.heldout_len, n_threads=args.threads)
    base = BaseLogits.compute(runner, heldout, batch_size=1)
    runner.close()
    print(f"base (llama.cpp, F32): perplexity {base.base_ppl:.4f} on {base.num_predictions} tokens")

    def measure(
        key: str, plan, embedding_type: str, output_type: str, imatrix=importance, **extra
    ) -> None:
        if results.has(key):
            return
        path = out / f"{key.replace(' ', '_').replace(',', '+')}.gguf"
        t0 = time.perf_counter()
        report = export_model(
            model,
            plan,
            path,
            "gguf",
            force=True,
            embedding_type=embedding_type,
            output_type=output_type,
            importance=imatrix,
        )
        runner = LlamaCppModel(path, n_ctx=args.heldout_len, n_threads=args.threads)
        measured = base.compare(runner, batch_size=1)
        runner.close()
        row = {
            "file_bytes": report.file_bytes,
            "tensor_bytes": report.tensor_bytes,
            "bpw_file": report.bits_per_weight,
            "bpw_layers": report.planned_bits_per_weight,
            "kl": measured.kl,
            "top1": measured.top1_agreement,
            "ppl": measured.ppl,
            "types": report.type_counts,
            "seconds": time.perf_counter() - t0,
            **extra,
        }
        results.add(key, row)
        path.unlink()  # the files are large; the numbers are what is kept
        print(key, json.dumps({k: v for k, v in row.items() if k != "types"}))

    gguf_all = args.options == "gguf-all"
    scores = {}

    def scores_for(options: list[str]):
        names = ",".join(options)
        if names not in scores:
            formats = parse_format_list(options, imatrix=importance is not None)
            scores[names] = score(model, formats, calib, scorer=args.scorer, importance=importance)
        return scores[names]

    with_imatrix = importance is not None  # gguf-all then includes IQ2_XS ... too
    all_options = (
        [f.name for f in parse_format_list(args.options, imatrix=with_imatrix)]
        if gguf_all
        else None
    )
    hidden = model.module.config.hidden_size
    embed = model.layers.embeddings[0].name
    # --like's windows: the calibration text after the windows the scores used.
    windows = check_tokens(model, args.calib_samples, args.calib_len) if args.like else None
    for mix in mixes:
        rule = llama_cpp_mix_plan(model, mix, model_id, imatrix=importance is not None)
        embedding_type, output_type = mix_tensor_types(mix, hidden)
        options = all_options or (
            mix_options(mix, model) if args.options == "mix" else args.options.split(",")
        )
        ours = solve_gguf_plans(model, options, scores_for(options), [rule.avg_bits], model_id)[0]
        measure(f"{mix} rule", rule, embedding_type, output_type, mix=mix, recipe="rule")
        measure(f"{mix} bitplan", ours, embedding_type, output_type, mix=mix, recipe="bitplan")
        # With the head: the plan's own type for the output tensor (and the embedding, tied or
        # with --untie) replaces the mix's; the file is held to the rule's whole size. With
        # --untie also the same with the embedding pinned to the mix's type: what choosing it adds.
        variants = {"bitplan+head": []} if args.with_head else {}
        if args.with_head and args.untie:
            variants["bitplan+output"] = [f"^{embed}$={embedding_type}"]
        for recipe, pins in variants.items():
            if results.has(f"{mix} {recipe}"):
                continue
            found = bitplan.search(
                model,
                options,
                target_size=results.data["rows"][f"{mix} rule"]["file_bytes"],
                include_head=True,
                pins=pins,
                imatrix=importance is not None,
                scorer=args.scorer,
                n_samples=args.calib_samples,
                seq_len=args.calib_len,
                progress=False,
            )
            plan = found.plans[0]
            chosen = {"head_type": plan.layer_formats[model.layers.head().name]}
            if embed in plan.layer_formats and not pins:
                chosen["embedding_choice"] = plan.layer_formats[embed]
            measure(f"{mix} {recipe}", plan, embedding_type, output_type, found.importance,
                    mix=mix, recipe=recipe, **chosen)  # fmt: skip
        if args.like and not results.has(f"{mix} like"):
            best, kls = least_divergent(
                model, [ours, rule], windows, embedding_type, output_type, importance
            )
            kept = {"calib_kl": kls, "kept": ["bitplan", "rule"][best]}
            print(f"{mix} --like: calibration KL bitplan {kls[0]:.5f}, rule {kls[1]:.5f}")
            measure(f"{mix} like", [ours, rule][best], embedding_type, output_type, mix=mix,
                    recipe="bitplan --like", **kept)  # fmt: skip
        check = f"{mix} vs llama_model_quantize"
        if check not in results.data["checks"]:
            theirs, mine = out / f"{mix}-llama-quantize.gguf", out / f"{mix}-rule-plain.gguf"
            if llama_cpp_quantize(f32_path, theirs, mix):
                plain = llama_cpp_mix_plan(model, mix, model_id)  # the rule without an imatrix
                export_model(model, plain, mine, "gguf", force=True, embedding_type=embedding_type,
                             output_type=output_type)  # fmt: skip
                equal, total = same_tensors(mine, theirs)
                line = f"{equal}/{total} tensors byte-identical (without imatrix)"
                mine.unlink()
                theirs.unlink()
            else:
                line = "llama_model_quantize refuses this mix without an importance matrix"
            results.check(check, line)
            print(check, line)
    if front:
        options = all_options or args.options.split(",")
        for budget in front:
            try:
                (plan,) = solve_gguf_plans(model, options, scores_for(options), [budget], model_id)
            except BitplanError as err:  # below what the options reach on this model
                print(f"front {budget:g}: {err}")
                continue
            types = mix_tensor_types(FRONT_TYPES_OF, hidden)
            measure(f"front {budget:g}", plan, *types, recipe="bitplan front")

    print_table(results.data, mixes)
    if args.plot:
        plot(results.data, args.plot, model.name)
    print(f"done in {time.perf_counter() - started:.0f} s")


def print_table(data: dict, mixes: list[str]) -> None:
    rows = data["rows"]
    print("| mix | file MiB | rule KL | bitplan KL | bitplan ÷ rule | top-1 rule / bitplan "
          "| ppl rule / bitplan |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mix in mixes:
        rule, ours = rows.get(f"{mix} rule"), rows.get(f"{mix} bitplan")
        if rule is None or ours is None:
            continue
        print(
            f"| {mix} | {rule['file_bytes'] / 2**20:.2f} / {ours['file_bytes'] / 2**20:.2f} "
            f"| {rule['kl']:.5f} | {ours['kl']:.5f} | {ours['kl'] / rule['kl']:.2f} "
            f"| {rule['top1']:.4f} / {ours['top1']:.4f} | {rule['ppl']:.3f} / {ours['ppl']:.3f} |"
        )
    headed = with_rule(rows, mixes, "bitplan+head")
    if headed:
        print("\n| mix | file MiB rule / bitplan+head | KL bitplan+head | ÷ rule | output (plan) |")
        print("|---|---:|---:|---:|---|")
        for mix, rule, ours in headed:
            print(f"| {mix} | {rule['file_bytes'] / 2**20:.2f} / {ours['file_bytes'] / 2**20:.2f} "
                  f"| {ours['kl']:.5f} | {ours['kl'] / rule['kl']:.2f} | {ours['head_type']} |")  # fmt: skip
    liked = with_rule(rows, mixes, "like")
    if liked:
        print("\n| mix | calibration KL bitplan / rule | kept | held-out KL | ÷ rule |")
        print("|---|---:|---|---:|---:|")
        for mix, rule, like in liked:
            ours, theirs = like["calib_kl"]
            print(f"| {mix} | {ours:.5f} / {theirs:.5f} | {like['kept']} | {like['kl']:.5f} "
                  f"| {like['kl'] / rule['kl']:.2f} |")  # fmt: skip
    for key, line in data["checks"].items():
        print(f"- {key}: {line}")


def with_rule(rows: dict, mixes: list[str], recipe: str) -> list[tuple[str, dict, dict]]:
    """(mix, the rule's row, the row of ``recipe``) for every mix that has both."""
    return [(mix, rows[f"{mix} rule"], rows[f"{mix} {recipe}"]) for mix in mixes
            if f"{mix} {recipe}" in rows and f"{mix} rule" in rows]  # fmt: skip


def plot(data: dict, path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"].values()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {
        "rule": ("o-", "llama.cpp mixes"),
        "bitplan": ("s-", "bitplan at each mix's size"),
        "bitplan+head": ("d-", "bitplan, output/embedding in the plan, at each mix's size"),
        "bitplan front": ("x:", "bitplan front"),
    }
    for recipe, (style, label) in labels.items():
        points = sorted((r["file_bytes"] / 2**20, r["kl"]) for r in rows if r["recipe"] == recipe)
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    for r in rows:
        if r["recipe"] == "rule":
            ax.annotate(r["mix"], (r["file_bytes"] / 2**20, r["kl"]), fontsize=7)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("KL(F32 || file), nats/token (llama.cpp)")
    ax.set_yscale("log")
    ax.set_title(f"{model_name}: GGUF files, KL against size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
