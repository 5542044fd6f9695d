"""llama.cpp's mixes and i-quants, file against file.

``llama_model_quantize`` (what ``llama-quantize`` runs) turns an F32 tiny GGUF into each of
llama.cpp's mixes (Q2_K ... IQ4_XS), and into each i-quant alone (``pure``), with and without an
importance matrix; bitplan's export of the same recipe must equal it tensor by tensor, type and
bytes. Where llama.cpp refuses (an i-quant that needs an imatrix, without one), bitplan must
refuse too.

Two tiny llamas so that every rule and fallback shows up:

* ``narrow``: hidden 32 (rows of 32: 256-block types fall back, Q6_K output becomes Q8_0),
  ffn_down rows of 256 (they fit), 16 blocks (the n/8 and n/16 rules), 4 / 2 heads, tied;
* ``wide``: hidden 256 (fits), ffn_down rows of 96 (fall back), 2 blocks, 4 / 1 heads (the
  ``n_gqa >= 4`` rules), untied token embedding and output.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf_export import build_gguf_llama, write_tokenizer_gguf

from bitplan.errors import BitplanError
from bitplan.exporters import export_model
from bitplan.exporters.gguf_layout import gguf_layout
from bitplan.formats.gguf import GGML_TYPES
from bitplan.model.loading import LoadedModel
from bitplan.plans import (
    LLAMA_CPP_MIXES,
    Plan,
    llama_cpp_mix_plan,
    mix_layer_type,
    mix_tensor_types,
    uniform_gguf_plan,
)
from bitplan.scoring.importance import collect_importance

MODELS = {
    "narrow": dict(tied=True, hidden=32, intermediate=256, blocks=16, kv_heads=2),
    "wide": dict(tied=False, hidden=256, intermediate=96, blocks=2, kv_heads=1),
}
#: Each i-quant and the llama.cpp file type whose default type it is (used with ``pure``).
IQUANT_FTYPES = {
    "IQ4_NL": "IQ4_NL",
    "IQ4_XS": "IQ4_XS",
    "IQ3_S": "IQ3_S",
    "IQ3_XXS": "IQ3_XXS",
    "IQ2_S": "IQ2_M",  # llama.cpp's IQ2_S file type is mostly IQ2_XS
    "IQ2_XS": "IQ2_XS",
    "IQ2_XXS": "IQ2_XXS",
    "IQ1_M": "IQ1_M",
    "IQ1_S": "IQ1_S",
}


@dataclass
class Case:
    model: LoadedModel
    source: Path  # the model as an F32 GGUF, llama.cpp's input
    importance: dict[str, np.ndarray]  # bitplan's imatrix, by layer
    tokenizer_gguf: Path


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory, tiny_tokenizer) -> Case:
    folder = tmp_path_factory.mktemp(request.param)
    tokenizer = write_tokenizer_gguf(folder / "tokenizer.gguf", tiny_tokenizer)
    model = build_gguf_llama(len(tiny_tokenizer), **MODELS[request.param])
    source = folder / "f32.gguf"
    f32 = uniform_gguf_plan(model, "f32", model_id="tiny")
    export_model(
        model,
        f32,
        source,
        "gguf",
        embedding_type="f32",
        output_type="f32",
        metadata_from=tokenizer,
    )
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.module.config.vocab_size, (2, 16), generator=generator)
    importance = collect_importance(model, tokens)
    # The token embedding has no activations to measure; give it one too, so that every
    # tensor can be an i-quant that ggml refuses to quantize without one (IQ2_XS ...).
    rng = np.random.default_rng(2)
    importance["model.embed_tokens"] = rng.uniform(0.5, 2, model.module.config.hidden_size)
    return Case(model, source, importance, tokenizer)


def llama_quantize(
    llama_cpp, case: Case, path: Path, ftype: str, imatrix: dict | None, pure: bool = False
) -> bool:
    """llama.cpp's ``llama_model_quantize`` of the F32 file; True when it succeeds."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    params.pure = pure
    if imatrix is not None:  # a list of (name, data, size) ending with a NULL name
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        vectors = [np.ascontiguousarray(v, np.float32) for v in imatrix.values()]
        for entry, name, vector in zip(entries[:-1], imatrix, vectors, strict=True):
            entry.name = name.encode()
            entry.data = vector.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = vector.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return (
        llama_cpp.llama_model_quantize(str(case.source).encode(), str(path).encode(), params) == 0
    )


def check_same_as_llama_cpp(
    llama_cpp,
    case: Case,
    tmp_path: Path,
    plan: Plan,
    tensor_types: tuple[str, str],
    ftype: str,
    with_imatrix: bool,
    pure: bool = False,
) -> None:
    """llama.cpp's file of ``ftype`` equals bitplan's export of ``plan``, or both refuse."""
    embedding_type, output_type = tensor_types
    layout = gguf_layout(case.model, plan, embedding_type, output_type)
    importance = case.importance if with_imatrix else None
    # llama.cpp gets, under each tensor's GGUF name, the vector bitplan quantizes it with.
    imatrix = None
    if with_imatrix:
        vectors = {t.name: t.importance(case.importance) for t in layout}
        imatrix = {name: v for name, v in vectors.items() if v is not None}
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    succeeded = llama_quantize(llama_cpp, case, theirs, ftype, imatrix, pure)
    export = dict(embedding_type=embedding_type, output_type=output_type, importance=importance)
    if any(GGML_TYPES[t.type_name].needs_imatrix for t in layout) and not with_imatrix:
        assert not succeeded, "llama.cpp quantized without the imatrix bitplan requires"
        with pytest.raises(BitplanError, match="needs an importance matrix"):
            export_model(
                case.model, plan, ours, "gguf", **export, metadata_from=case.tokenizer_gguf
            )
        return
    assert succeeded
    export_model(case.model, plan, ours, "gguf", **export, metadata_from=case.tokenizer_gguf)
    their_tensors = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    our_tensors = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert set(their_tensors) == set(our_tensors)
    types = {
        name: (t.tensor_type.name, their_tensors[name].tensor_type.name)
        for name, t in our_tensors.items()
    }
    assert {name: pair for name, pair in types.items() if pair[0] != pair[1]} == {}
    different = [
        name
        for name, t in our_tensors.items()
        if not np.array_equal(np.array(t.data), np.array(their_tensors[name].data))
    ]
    assert different == []


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("mix", LLAMA_CPP_MIXES)
def test_llama_quantize_mix_equals_our_recipe(llama_cpp, case, mix, with_imatrix, tmp_path):
    plan = llama_cpp_mix_plan(case.model, mix, model_id="tiny", imatrix=with_imatrix)
    tensor_types = mix_tensor_types(mix, case.model.module.config.hidden_size)
    check_same_as_llama_cpp(llama_cpp, case, tmp_path, plan, tensor_types, mix, with_imatrix)


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("type_name", list(IQUANT_FTYPES))
@pytest.mark.parametrize("case", ["narrow"], indirect=True)  # rows that fit and rows that don't
def test_llama_quantize_pure_iquant_equals_our_format(
    llama_cpp, case, type_name, with_imatrix, tmp_path
):
    """Every tensor in one i-quant (llama.cpp's ``pure``; IQ4_NL where rows fall back)."""
    name = type_name.lower()
    plan = uniform_gguf_plan(case.model, name, model_id="tiny")
    ftype = IQUANT_FTYPES[type_name]
    check_same_as_llama_cpp(
        llama_cpp, case, tmp_path, plan, (name, name), ftype, with_imatrix, pure=True
    )


# ---------------------------------------------------------------- the rules themselves


def test_i_quant_mix_rules():
    """What the tiny models cannot show: SmolLM2-like 30 blocks, GQA 3 and 4."""
    assert [mix_layer_type("IQ2_M", "down", i, 30, 3) for i in (2, 3)] == ["iq3_s", "iq2_s"]
    assert mix_layer_type("IQ2_M", "v", 9, 30, 3) == "iq3_s"
    assert mix_layer_type("IQ2_M", "v", 9, 30, 4) == "q4_k"
    assert mix_layer_type("IQ2_M", "o", 9, 30, 3) == "iq3_s"
    assert mix_layer_type("IQ3_M", "v", 9, 30, 3) == "q4_k"
    assert mix_layer_type("IQ3_M", "down", 3, 30, 3) == "iq3_s"
    assert mix_layer_type("IQ4_XS", "down", 0, 30, 3) == "q5_k"
    assert mix_layer_type("IQ4_XS", "down", 0, 30, 3, imatrix=True) == "iq4_xs"
    assert mix_layer_type("IQ4_XS", "v", 0, 30, 3) == "iq4_xs"
    assert mix_layer_type("IQ4_XS", "v", 0, 30, 4) == "q5_k"
    assert mix_tensor_types("IQ2_M") == ("iq3_s", "q5_k")
    assert mix_tensor_types("IQ2_M", 576) == ("iq3_s", "q8_0")  # Q8_0, not Q5_K's Q5_1
    assert mix_tensor_types("Q3_K_S", 576) == ("q3_k", "q8_0")
    assert mix_tensor_types("IQ4_XS") == ("iq4_xs", "q6_k")
