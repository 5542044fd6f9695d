"""GGUF tensor types as formats: names, llama.cpp's bit costs and fallback, and quantization that
matches the ``gguf`` package's reference implementations bit for bit.

(Equality with llama.cpp's own C quantizers is in ``test_gguf_llama_cpp.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from bitplan.errors import BitplanError
from bitplan.formats import BF16Format, MXFormat, parse_format, parse_format_list
from bitplan.formats.gguf import (
    GGML_TYPES,
    GGUFFormat,
    bits_per_weight,
    dequantize_rows,
    quantize_rows,
    resolve_type,
)

K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
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


def test_formats_are_frozen_and_weight_only():
    fmt = parse_format("q6_k")
    with pytest.raises(AttributeError):
        fmt.type_name = "Q4_K"
    x = torch.randn(2, 256)
    assert fmt.quantize_activation(x) is x and not fmt.quantizes_activations


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
    ],
)
def test_llama_cpp_fallback_for_rows_blocks_do_not_divide(name, shape, stored, bpw):
    fmt = parse_format(name)
    assert fmt.tensor_type(shape) == stored
    assert fmt.bits_per_weight(shape) == bpw
    w = torch.randn(4, shape[1])  # the stored type depends on the row length only
    expected = dequantize_rows(quantize_rows(w.numpy(), stored), stored)
    assert torch.equal(fmt.quantize_weight(w), torch.from_numpy(expected))


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


@pytest.mark.parametrize("type_name", list(GGML_TYPES))
def test_quantize_dequantize_equals_the_gguf_package(type_name):
    """quantize_weight == the gguf package's dequantize of the bytes we write (for the types it
    can quantize, of the bytes it writes itself)."""
    x = random_rows(3)
    fmt = GGUFFormat(type_name)
    ggml = GGMLQuantizationType[type_name]
    data = (
        quants.quantize(x, ggml) if type_name in GGUF_PY_QUANTIZES else quantize_rows(x, type_name)
    )
    expected = quants.dequantize(data, ggml).astype(np.float32)
    result = fmt.quantize_weight(torch.from_numpy(x))
    np.testing.assert_array_equal(result.numpy(), expected)


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


@pytest.mark.parametrize("type_name", IMATRIX_TYPES)
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
