"""GGUF tensor types as formats: names, llama.cpp's bit costs and fallback, and quantization that
matches the ``gguf`` package's reference implementations bit for bit.

(Equality of the numpy port with llama.cpp's own C quantizer is in ``test_gguf_export.py``; the
i-quants and llama.cpp's mixes, file against file, in ``test_gguf_mixes.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from bitplan.errors import BitplanError
from bitplan.formats import BF16Format, MXFormat, parse_format, parse_format_list
from bitplan.formats.ggml_quantizer import ggml_available, ggml_dequantize_rows
from bitplan.formats.gguf import (
    GGML_TYPES,
    PORTED_TYPES,
    GGUFFormat,
    bits_per_weight,
    dequantize_rows,
    port_quantize_rows,
    quantize_rows,
    resolve_type,
)
from bitplan.formats.gguf_activations import round_q8_0, round_q8_k
from bitplan.plans import Plan

#: The i-quants need llama.cpp's ggml (llama-cpp-python) to quantize.
needs_ggml = pytest.mark.skipif(not ggml_available(), reason="needs llama-cpp-python")
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
I_QUANTS = [name for name in GGML_TYPES if name.startswith("IQ")]
NEEDS_IMATRIX = [name for name in I_QUANTS if GGML_TYPES[name].needs_imatrix]
#: Types the gguf package can quantize itself (k-quants it can only dequantize).
GGUF_PY_QUANTIZES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "BF16"]
IMATRIX_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def random_rows(seed: int, rows: int = 48, cols: int = 512) -> np.ndarray:
    """Gaussian weights with the awkward cases mixed in: outliers, an all-zero stretch, a
    one-signed stretch, a tiny row and exact ties."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[0, :40] = 0
    x[1] *= 1e-6
    x[2, 100:300] = np.abs(x[2, 100:300])
    x[3, ::17] *= 25
    x[4, :64] = np.float32(0.01) * rng.integers(-8, 8, 64)
    return x


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("q4_k", "q4_k"),
        ("Q4_K", "q4_k"),
        ("gguf:q4_k_s", "q4_k"),
        ("GGUF:Q4_K_M", "q4_k"),
        ("GGUF:Q2_K_S", "q2_k"),
        ("q3_k_l", "q3_k"),
        ("Q8_0", "q8_0"),
        ("gguf:q8_0", "q8_0"),
        ("q5_1", "q5_1"),
        ("gguf:mxfp4", "gguf:mxfp4"),
        ("GGUF:BF16", "gguf:bf16"),
        (" f16 ", "f16"),
        ("iq4_xs", "iq4_xs"),
        ("IQ2_XXS", "iq2_xxs"),
        ("gguf:iq1_m", "iq1_m"),
        ("GGUF:IQ4_NL", "iq4_nl"),
    ],
)
def test_gguf_names_parse(spelling, canonical):
    fmt = parse_format(spelling)
    assert isinstance(fmt, GGUFFormat)
    assert fmt.name == canonical and str(fmt) == canonical
    assert parse_format(fmt.name) == fmt
    assert hash(parse_format(fmt.name)) == hash(fmt)


def test_bitplan_names_keep_their_meaning():
    # mxfp4 and bf16 are bitplan's own formats; the llama.cpp ones need the gguf: prefix.
    assert isinstance(parse_format("mxfp4"), MXFormat)
    assert isinstance(parse_format("bf16"), BF16Format)
    assert parse_format("gguf:mxfp4") != parse_format("mxfp4")


def test_option_lists_and_unknown_names():
    assert [f.name for f in parse_format_list("q2_k,gguf:q4_k_s")] == ["q2_k", "q4_k"]
    with pytest.raises(BitplanError, match="listed twice"):
        parse_format_list("q4_k,GGUF:Q4_K_M")
    with pytest.raises(BitplanError, match="unknown format"):
        parse_format("q7_k")
    with pytest.raises(BitplanError, match="unknown GGUF type"):
        GGUFFormat("Q9_K")


def test_formats_are_frozen():
    fmt = parse_format("q6_k")
    with pytest.raises(AttributeError):
        fmt.type_name = "Q4_K"


def test_activations_are_rounded_as_llama_cpps_matmul_rounds_them():
    """Each type rounds its input to its ``vec_dot_type``, chosen by the type the rows are
    stored in: Q6_K on rows of 512 rounds to Q8_K (blocks of 256), but on rows of 96 it falls
    back to Q8_0 and rounds to Q8_0 (blocks of 32); BF16 rounds to bfloat16."""
    x = torch.randn(3, 512, dtype=torch.float64)
    x[0, 7] = 100  # an outlier: Q8_K's steps of 100 / 127 then span its whole block of 256
    q6_k = parse_format("q6_k")
    assert q6_k.quantizes_activations
    k_rounded = q6_k.quantize_activation(x)
    assert k_rounded.dtype == x.dtype
    assert torch.equal(k_rounded, round_q8_k(x).double())
    steps = k_rounded[0, :256] / (100 / 127)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    q8_0_rounded = parse_format("q4_0").quantize_activation(x)
    assert torch.equal(q8_0_rounded, round_q8_0(x).double())
    outside = slice(32, 256)  # the outlier's Q8_0 block ends at 32; its Q8_K block does not
    assert (q8_0_rounded - x)[0, outside].abs().max() < (k_rounded - x)[0, outside].abs().max() / 4
    narrow = torch.randn(2, 96)
    assert torch.equal(q6_k.quantize_activation(narrow), round_q8_0(narrow))
    assert torch.equal(
        parse_format("gguf:bf16").quantize_activation(narrow), narrow.bfloat16().float()
    )


# ---------------------------------------------------------------- bits and fallback


@pytest.mark.parametrize(
    ("type_name", "bpw", "element_bits"),
    [
        ("Q2_K", 2.625, 2),
        ("Q3_K", 3.4375, 3),
        ("Q4_K", 4.5, 4),
        ("Q5_K", 5.5, 5),
        ("Q6_K", 6.5625, 6),
        ("Q8_0", 8.5, 8),
        ("Q4_0", 4.5, 4),
        ("Q4_1", 5.0, 4),
        ("Q5_0", 5.5, 5),
        ("Q5_1", 6.0, 5),
        ("MXFP4", 4.25, 4),
        ("BF16", 16.0, 16),
        ("F16", 16.0, 16),
    ],
)
def test_bits_as_llama_cpp_counts_them(type_name, bpw, element_bits):
    fmt = GGUFFormat(type_name)
    shape = (64, 1024)
    assert bits_per_weight(type_name) == bpw
    assert fmt.weight_bits(shape) == 64 * 1024 * bpw
    assert fmt.bits_per_weight(shape) == bpw
    assert fmt.weight_bits(shape, include_scales=False) == 64 * 1024 * element_bits
    # What is counted is what is stored.
    data = quantize_rows(np.ones((64, 1024), np.float32), type_name)
    assert data.nbytes * 8 == fmt.weight_bits(shape)


@pytest.mark.parametrize(
    ("type_name", "bpw", "block", "fallback", "needs_imatrix"),
    [
        ("IQ4_NL", 4.5, 32, "F16", False),
        ("IQ4_XS", 4.25, 256, "IQ4_NL", False),
        ("IQ3_S", 3.4375, 256, "IQ4_NL", False),
        ("IQ3_XXS", 3.0625, 256, "IQ4_NL", True),
        ("IQ2_S", 2.5625, 256, "IQ4_NL", True),
        ("IQ2_XS", 2.3125, 256, "IQ4_NL", True),
        ("IQ2_XXS", 2.0625, 256, "IQ4_NL", True),
        ("IQ1_M", 1.75, 256, "IQ4_NL", True),
        ("IQ1_S", 1.5625, 256, "IQ4_NL", True),
    ],
)
def test_i_quant_bits_fallback_and_imatrix(type_name, bpw, block, fallback, needs_imatrix):
    ggml_type = GGML_TYPES[type_name]
    assert (ggml_type.bits_per_weight, ggml_type.block_size) == (bpw, block)
    assert (ggml_type.fallback, ggml_type.needs_imatrix) == (fallback, needs_imatrix)
    assert GGUFFormat(type_name).weight_bits((64, 1024)) == 64 * 1024 * bpw
    if ggml_available():  # what is counted is what is stored
        x = random_rows(0, 8, 1024)
        data = quantize_rows(x, type_name, np.ones(1024, np.float32))
        assert data.nbytes * 8 == GGUFFormat(type_name).weight_bits((8, 1024))


@pytest.mark.parametrize("type_name", NEEDS_IMATRIX)
def test_i_quants_refuse_to_quantize_without_an_imatrix(type_name):
    """As llama-quantize does (and ggml aborts the process for some): a one-line error that
    says what to pass."""
    fmt = GGUFFormat(type_name)
    with pytest.raises(
        BitplanError, match=rf"^{type_name} needs an importance matrix.*importance="
    ):
        fmt.quantize_weight(torch.randn(4, 512))
    # Rows that fall back to IQ4_NL need none, as in llama.cpp.
    if ggml_available():
        assert fmt.quantize_weight(torch.randn(4, 576)).shape == (4, 576)


def test_without_llama_cpp_the_port_quantizes(monkeypatch):
    """llama-cpp-python is optional: the port's types work without it."""
    import bitplan.formats.gguf as gguf_module

    def no_ggml(*args):
        raise AssertionError("ggml called")

    monkeypatch.setattr(gguf_module, "ggml_available", lambda: False)
    monkeypatch.setattr(gguf_module, "ggml_quantize_rows", no_ggml)
    x = random_rows(1)
    np.testing.assert_array_equal(quantize_rows(x, "Q4_K"), port_quantize_rows(x, "Q4_K"))
    with pytest.raises(BitplanError, match="numpy port has no IQ4_XS"):
        port_quantize_rows(x, "IQ4_XS")


def test_without_llama_cpp_i_quants_say_what_to_install(monkeypatch):
    from bitplan.formats import ggml_quantizer

    monkeypatch.setattr(ggml_quantizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BitplanError, match=r"install llama-cpp-python \(pip install"):
        ggml_quantizer._library.__wrapped__()  # what a first i-quant would load


# SmolLM2-135M: every layer but down_proj reads rows of 576 = 2.25 x 256.
@pytest.mark.parametrize(
    ("name", "shape", "stored", "bpw"),
    [
        ("q4_k", (576, 576), "Q5_0", 5.5),
        ("q4_k", (576, 1536), "Q4_K", 4.5),
        ("q6_k", (192, 576), "Q8_0", 8.5),
        ("q6_k", (576, 1536), "Q6_K", 6.5625),
        ("q2_k", (1536, 576), "Q4_0", 4.5),
        ("q3_k", (1536, 576), "Q4_0", 4.5),
        ("q5_k", (576, 576), "Q5_1", 6.0),
        ("q8_0", (576, 576), "Q8_0", 8.5),
        ("q8_0", (8, 100), "F16", 16.0),  # not even 32 divides: llama.cpp writes F16
        ("q4_k", (8, 100), "F16", 16.0),
        pytest.param("iq2_xs", (576, 576), "IQ4_NL", 4.5, marks=needs_ggml),
        pytest.param("iq4_xs", (576, 576), "IQ4_NL", 4.5, marks=needs_ggml),
        pytest.param("iq4_xs", (576, 1536), "IQ4_XS", 4.25, marks=needs_ggml),
        ("iq1_m", (8, 100), "F16", 16.0),  # IQ4_NL does not fit either: "must use F16"
    ],
)
def test_llama_cpp_fallback_for_rows_blocks_do_not_divide(name, shape, stored, bpw):
    fmt = parse_format(name)
    assert fmt.tensor_type(shape) == stored
    assert fmt.bits_per_weight(shape) == bpw
    w = torch.randn(4, shape[1])  # the stored type depends on the row length only
    expected = dequantize_rows(quantize_rows(w.numpy(), stored), stored)
    assert torch.equal(fmt.quantize_weight(w), torch.from_numpy(expected))


def test_plans_count_fallback_types_under_what_the_file_stores():
    formats = {"a": "iq1_m", "b": "iq1_m", "c": "q4_k", "d": "mxfp4"}
    plan = Plan("m", "bitplan", [], formats, None, 4, 4, 4, False, False)
    shapes = {"a": (8, 576), "b": (8, 512), "c": (8, 96), "d": (8, 576)}
    assert plan.format_counts() == {"iq1_m": 2, "mxfp4": 1, "q4_k": 1}
    assert plan.format_counts(shapes) == {
        "iq1_m": 1,
        "iq1_m→iq4_nl": 1,
        "mxfp4": 1,
        "q4_k→q5_0": 1,
    }


def test_resolve_type_and_refusals():
    assert resolve_type("Q4_K", 512).name == "Q4_K"
    assert resolve_type("Q4_K", 96).name == "Q5_0"
    with pytest.raises(BitplanError, match="multiple of 256"):
        quantize_rows(np.ones((2, 576), np.float32), "Q4_K")
    with pytest.raises(BitplanError, match="importance"):
        quantize_rows(np.ones((2, 512), np.float32), "Q4_K", np.ones(256, np.float32))


# ---------------------------------------------------------------- against the gguf package


@pytest.mark.parametrize("type_name", GGUF_PY_QUANTIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_bytes_equal_the_gguf_package_quantizer(type_name, seed):
    x = random_rows(seed)
    ours = quantize_rows(x, type_name)
    reference = quants.quantize(x, GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(ours, reference)


def with_ggml(type_names: list[str]) -> list:
    """The type names, those that only ggml quantizes marked to need it."""
    return [t if t in PORTED_TYPES else pytest.param(t, marks=needs_ggml) for t in type_names]


def importance_if_needed(type_name: str) -> np.ndarray | None:
    return (
        np.linspace(0.5, 2, 512, dtype=np.float32) if GGML_TYPES[type_name].needs_imatrix else None
    )


@pytest.mark.parametrize("type_name", with_ggml(list(GGML_TYPES)))
def test_quantize_dequantize_equals_the_gguf_package(type_name):
    """quantize_weight == the gguf package's dequantize of the bytes we write (for the types it
    can quantize, of the bytes it writes itself)."""
    x = random_rows(3)
    fmt = GGUFFormat(type_name)
    ggml = GGMLQuantizationType[type_name]
    importance = importance_if_needed(type_name)
    data = (
        quants.quantize(x, ggml)
        if type_name in GGUF_PY_QUANTIZES
        else quantize_rows(x, type_name, importance)
    )
    expected = quants.dequantize(data, ggml).astype(np.float32)
    result = fmt.quantize_weight(torch.from_numpy(x), importance=importance)
    np.testing.assert_array_equal(result.numpy(), expected)


@needs_ggml
@pytest.mark.parametrize("type_name", [t for t in GGML_TYPES if t not in ("BF16", "F16", "F32")])
def test_gguf_package_dequantizes_as_ggml_does(type_name):
    """bitplan dequantizes with the gguf package; llama.cpp with ggml's dequantize_row_*."""
    x = random_rows(7)
    data = quantize_rows(x, type_name, importance_if_needed(type_name))
    np.testing.assert_array_equal(
        dequantize_rows(data, type_name), ggml_dequantize_rows(data, type_name, x.shape[1])
    )


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_k_quant_error_is_what_the_bits_allow(type_name):
    x = random_rows(4)[8:]  # plain Gaussian rows
    y = GGUFFormat(type_name).quantize_weight(torch.from_numpy(x)).numpy()
    relative_mse = float(((y - x) ** 2).mean() / (x**2).mean())
    bits = GGML_TYPES[type_name].element_bits
    assert 0 < relative_mse < 4.0 ** (1.5 - bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_dtype_and_zeros(dtype):
    fmt = parse_format("q4_k")
    w = torch.randn(4, 512).to(dtype)
    before = w.clone()
    out = fmt.quantize_weight(w)
    assert out.shape == w.shape and out.dtype == dtype and torch.equal(w, before)
    assert (fmt.quantize_weight(torch.zeros(3, 512)) == 0).all()
    with pytest.raises(BitplanError, match="floating-point"):
        fmt.quantize_weight(torch.ones(2, 256, dtype=torch.int32))


# ---------------------------------------------------------------- importance matrix


@pytest.mark.parametrize("type_name", with_ggml(IMATRIX_TYPES + ["IQ4_NL", "IQ4_XS", "IQ3_S"]))
def test_importance_lowers_the_weighted_error(type_name):
    """llama.cpp's imatrix search weighs each column by its activations' mean square: the error
    weighted that way must not grow (here: a strongly uneven importance, 96 rows)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((96, 512)) * 0.02).astype(np.float32)
    importance = (rng.lognormal(0.0, 1.5, 512) ** 2).astype(np.float32)
    fmt = GGUFFormat(type_name)
    plain = fmt.quantize_weight(torch.from_numpy(x)).numpy()
    weighted = fmt.quantize_weight(torch.from_numpy(x), importance=importance).numpy()
    error_plain = float((importance * (plain - x) ** 2).sum())
    error_weighted = float((importance * (weighted - x) ** 2).sum())
    assert error_weighted <= error_plain


@pytest.mark.parametrize("type_name", ["Q8_0", "MXFP4", "BF16"])
def test_types_without_an_importance_search_ignore_it(type_name):
    x = random_rows(6)
    importance = np.linspace(0.1, 3, 512, dtype=np.float32)
    np.testing.assert_array_equal(
        quantize_rows(x, type_name), quantize_rows(x, type_name, importance)
    )
