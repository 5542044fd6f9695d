"""How much of a GGUF file's KL is llama.cpp's rounding of activations, and whether the scores see it.

llama.cpp's CPU matmuls round each Linear's input to 8-bit blocks chosen by the weight's type
(Q8_0: 32 values per scale; Q8_K: 256, for the k-quants and most i-quants;
``bitplan/formats/gguf_activations.py``). For one of llama.cpp's mixes of a bundled model
(``--mix``, default Q4_K_M, written with an importance matrix from the calibration tokens) this
prints:

* **measured**: KL(unquantized ‖ the file's values) per token on held-out text, in float32
  (``fake_quantize_gguf``), with every Linear's input rounded: not at all; as llama.cpp rounds
  it; all to Q8_0; and all to Q8_0 but one role to Q8_K (where its input's width holds blocks of
  256), role by role;
* **predicted**: the default scorer's estimate (fisher-kl) of that rounding alone, weights left
  as they are, summed over each role's layers, for Q8_K and Q8_0.

    .venv/bin/python benchmarks/gguf_activation_rounding.py [--model gemma3-270m] [--mix Q4_K_M]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from bitplan.data.calibration import calibration_samples
from bitplan.data.heldout import heldout_samples
from bitplan.evaluation.divergence import BaseLogits
from bitplan.formats.base import Format
from bitplan.formats.gguf_activations import round_activations
from bitplan.model import load_model
from bitplan.plans import llama_cpp_mix_plan, mix_tensor_types
from bitplan.quantization.gguf import fake_quantize_gguf
from bitplan.scoring import score
from bitplan.scoring.importance import collect_importance


@dataclass(frozen=True)
class InputRounding(Format):
    """Leaves the weight as it is and rounds the input to llama.cpp's ``kind`` (Q8_0, Q8_K);
    an input whose width 256 does not divide rounds to Q8_0, as it would for any type."""

    kind: str
    quantizes_activations = True

    @property
    def name(self) -> str:
        return f"input-{self.kind.lower()}"

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        return round_activations(self.kind if x.shape[-1] % 256 == 0 else "Q8_0", x)

    def weight_bits(self, shape: tuple[int, int], include_scales: bool = True) -> int:
        return 16 * shape[0] * shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundled model key or folder (default: embedded default)")
    parser.add_argument("--mix", default="Q4_K_M", help="llama.cpp mix (default: %(default)s)")
    parser.add_argument("--heldout-samples", type=int, default=4)
    parser.add_argument("--heldout-len", type=int, default=512)
    args = parser.parse_args()
    started = time.perf_counter()
    model = load_model(args.model)
    calib = calibration_samples(model.tokenizer, 16, 256)
    importance = collect_importance(model, calib)
    roles = {layer.name: layer.role for layer in model.layers.decoder_layers()}
    roles[model.layers.head().name] = "lm_head"

    # Predicted: the input's rounding alone, per layer, by the default scorer.
    options = [InputRounding("Q8_K"), InputRounding("Q8_0")]
    wide = [
        layer
        for layer in model.layers.decoder_layers()
        if layer.shape[1] % 256 == 0  # only these can hold a k-quant, so round to Q8_K
    ]
    predicted = score(model, options, calib, cache=False).layer_scores if wide else {}
    by_role: dict[str, list[float]] = {}
    for layer in wide:
        k, z = (predicted[layer.name][o.name] for o in options)
        by_role.setdefault(layer.role, [0.0, 0.0])
        by_role[layer.role][0] += k
        by_role[layer.role][1] += z

    # Measured: the mix's file values, its inputs rounded in several ways.
    model.module.float()
    heldout = heldout_samples(model.tokenizer, args.heldout_samples, args.heldout_len)
    base = BaseLogits.compute(model.module, heldout, compute_dtype=torch.float32)
    plan = llama_cpp_mix_plan(model, args.mix, imatrix=True)
    embedding_type, output_type = mix_tensor_types(args.mix, model.module.config.hidden_size)
    values = fake_quantize_gguf(model, plan, embedding_type, output_type, importance)
    linears = {n: m for n, m in values.named_modules() if isinstance(m, nn.Linear)}
    as_llama = fake_quantize_gguf(
        model, plan, embedding_type, output_type, importance, llama_cpp_activations=True
    )

    def measured(kind_of=None, module: nn.Module = values) -> float:
        """KL with each Linear's input rounded to ``kind_of(name, in_features)`` (None: not)."""
        handles = []
        for name, linear in linears.items():
            kind = kind_of(name, linear.in_features) if kind_of else None
            if kind is not None:
                hook = _rounding_hook(kind)
                handles.append(linear.register_forward_pre_hook(hook))
        try:
            return base.compare(module, compute_dtype=torch.float32).kl
        finally:
            for handle in handles:
                handle.remove()

    print(f"{model.name}, llama.cpp {args.mix} (imatrix), {base.num_predictions} held-out tokens")
    q8_0 = measured(lambda name, width: "Q8_0")
    print(f"measured KL, weights only:              {measured():.5f}")
    print(f"measured KL, inputs as llama.cpp:       {measured(module=as_llama):.5f}")
    print(f"measured KL, every input Q8_0:          {q8_0:.5f}")
    for role in dict.fromkeys(roles.values()):

        def one_role_q8_k(name: str, width: int, role: str = role) -> str:
            return "Q8_K" if roles.get(name) == role and width % 256 == 0 else "Q8_0"

        if not any(r == role for n, r in roles.items() if linears[n].in_features % 256 == 0):
            continue  # its inputs round to Q8_0 whatever the type
        kl = measured(one_role_q8_k)
        line = f"measured KL, {role} Q8_K, others Q8_0:"
        extra = ""
        if role in by_role:
            k, z = by_role[role]
            extra = f"  (+{kl - q8_0:.5f}; predicted Q8_K {k:.5f} − Q8_0 {z:.5f} = +{k - z:.5f})"
        print(f"{line:40s}{kl:.5f}{extra}")
    print(f"done in {time.perf_counter() - started:.0f} s")


def _rounding_hook(kind: str):
    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        return (round_activations(kind, inputs[0]), *inputs[1:])

    return hook


if __name__ == "__main__":
    main()
