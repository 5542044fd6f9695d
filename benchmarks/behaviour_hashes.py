"""Hashes of what bitplan writes for fixed inputs: plans, and fake, packed, compressed-tensors
and gguf exports, on the tiny test model and on the embedded default.

A refactoring that must leave behaviour unchanged is checked by running this before and after
it and comparing the two outputs line by line. It drives the ``bitplan`` command (in one
process), the interface a refactoring keeps; scores are computed in float32 so that the plans do
not depend on the CPU's bfloat16 support.

    .venv/bin/python benchmarks/behaviour_hashes.py > before.txt
    ... change the code ...
    .venv/bin/python benchmarks/behaviour_hashes.py > after.txt && diff before.txt after.txt

``--tiny-only`` skips the embedded default (seconds instead of a few minutes). Timings, file
modes, PNG plots and cache details are left out of the hashes: they are not behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: JSON keys whose values vary from run to run (time, cache state, where files were).
VOLATILE_KEYS = {"seconds", "cache_hit", "cache_file", "path", "source"}


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in sorted(value.items()) if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(_stable(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".safetensors":
        # The header's metadata is a hash map the library writes in any order: compare it parsed.
        (length,) = struct.unpack("<Q", data[:8])
        header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True).encode()
        data = header + data[8 + length :]
    return hashlib.sha256(data).hexdigest()[:16]


def tree_digests(root: Path) -> list[str]:
    lines = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix != ".png":
            lines.append(f"{path.relative_to(root)} {file_digest(path)}")
    return lines


def run(argv: list[str]) -> None:
    from bitplan.cli import main

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the hashes alone
        status = main(argv)
    if status != 0:
        raise SystemExit(f"bitplan {' '.join(argv)} exited {status}")


def tiny_model_folder(folder: Path) -> str:
    """The tests' tiny Llama and tokenizer, saved as a Hugging Face folder."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def cases(model: str | None, work: Path, gguf: bool, calibration: list[str]) -> None:
    """Search and export with every option set and export format (``model`` None: the
    embedded default)."""
    model_args = [model] if model else []
    common = ["--dtype", "float32", "--no-cache", *calibration]
    searches = {
        "mx": ["--options", "mxfp4,mxfp8", "--avg-bits", "4.5", "5", "6"],
        "int": ["--options", "w2g128,w4g128", "--avg-bits", "3", "--ignore-scale-bits"],
        "mixed": ["--options", "w4g32_asym,nvfp4,fp8,int8,mxfp6", "--avg-bits", "6"],
    }
    if gguf:
        searches["gguf"] = ["--options", "q4_k,q6_k", "--avg-bits", "6"]
    for name, options in searches.items():
        run(["search", *model_args, *options, "--out", str(work / f"plans_{name}"), *common])
    for recipe, budget in (("head", "5"), ("tail", "5"), ("uniform", None)):
        extra = ["--avg-bits", budget] if budget else []
        out = str(work / f"plans_{recipe}")
        run(
            [
                "search",
                *model_args,
                "--options",
                "mxfp4,mxfp8",
                "--recipe",
                recipe,
                *extra,
                "--out",
                out,
            ]
        )
    exports = {
        "packed": ["plans_mx/plan_bitplan_5.json", "plans_int/plan_bitplan_3.json"],
        "fake": ["plans_mixed/plan_bitplan_6.json"],
        "compressed-tensors": ["plans_int/plan_bitplan_3.json", "plans_mx/plan_bitplan_6.json"],
    }
    if gguf:
        exports["gguf"] = ["plans_gguf/plan_bitplan_6.json"]
    for fmt, plans in exports.items():
        for plan in plans:
            label = plan.split("/")[0] + "_" + fmt
            out = work / "exports" / (label + (".gguf" if fmt == "gguf" else ""))
            run(
                [
                    "quantize",
                    *model_args,
                    "--plan",
                    str(work / plan),
                    "--format",
                    fmt,
                    "--out",
                    str(out),
                ]
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-only", action="store_true", help="skip the embedded default")
    parser.add_argument("--keep", type=Path, help="write into this new folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            root = args.keep
        tiny = tiny_model_folder(root / "tiny_model")
        small_calibration = ["--n-samples", "4", "--seq-len", "32"]
        cases(tiny, root / "tiny", gguf=False, calibration=small_calibration)
        if not args.tiny_only:
            cases(None, root / "default", gguf=True, calibration=["--n-samples", "8"])
        lines = []
        for name in ("tiny", "default"):
            if (root / name).is_dir():
                lines += [f"{name}/{line}" for line in tree_digests(root / name)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
