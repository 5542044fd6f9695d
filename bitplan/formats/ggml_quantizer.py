"""llama.cpp's own C quantizer (``ggml_quantize_chunk`` in ``libggml-base``), through ctypes.

bitplan quantizes the i-quants (IQ4_NL ... IQ1_M) and the ternary types with ggml itself rather
than a port: their searches run over lattice grids that ``ggml_quantize_init`` builds, hundreds
of lines of C per type, and calling the C is exact by construction. The library is the one
``llama-cpp-python`` ships (the ``gguf`` extra), found without importing ``llama_cpp`` (that
would load all of llama.cpp). The tests also compare bitplan's numpy port of the other types
with it byte for byte, and the ``gguf`` package's dequantizers with ggml's.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import re
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from bitplan.errors import BitplanError


@functools.cache
def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise BitplanError(
            "the i-quants (iq4_nl ... iq1_s) are quantized by llama.cpp's own ggml library: "
            "install llama-cpp-python (pip install 'bitplan[gguf]')"
        )
    lib_dir = Path(spec.origin).parent / "lib"
    # The wheel holds copies (not links) libggml-base.so, .so.0, .so.0.25.3; libllama loads the
    # one named by its soname (.so.0). Loading that same file shares one ggml with llama.cpp,
    # so that the i-quant grids are built once per process (IQ1's take seconds).
    candidates = sorted(
        lib_dir.glob("libggml-base*"),
        key=lambda p: (re.search(r"\.so\.\d+$", p.name) is None, p.name),
    ) + sorted(lib_dir.glob("libggml.*"))  # older builds: one libggml
    if not candidates:
        raise BitplanError(f"llama-cpp-python is installed but {lib_dir} holds no libggml-base")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (element index)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix, or NULL
    ]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def ggml_available() -> bool:
    """Whether llama.cpp's ggml library can be loaded (llama-cpp-python is installed)."""
    try:
        _library()
    except (BitplanError, OSError):
        return False
    return True


def _row_bytes(ggml_type: GGMLQuantizationType, row_length: int) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    return row_length // block * type_size


def ggml_quantize_rows(
    rows: np.ndarray, type_name: str, importance: np.ndarray | None = None
) -> np.ndarray:
    """The bytes ggml's ``ggml_quantize_chunk`` writes for float32 ``rows`` (n_rows,
    row_length) in ``type_name``, as (n_rows, row_bytes) uint8; ``importance`` (row_length,)
    is the imatrix, or None. Rows must divide into the type's blocks (the caller checks)."""
    ggml_type = GGMLQuantizationType[type_name]
    lib = _library()
    rows = np.ascontiguousarray(rows, np.float32)
    # ggml asserts (aborting the whole process) without an imatrix where it needs one, and the
    # i-quants' grid searches abort on NaN; refuse both here instead.
    if importance is None and lib.ggml_quantize_requires_imatrix(int(ggml_type)):
        raise BitplanError(f"{type_name} needs an importance matrix (imatrix)")
    if not np.isfinite(rows).all():
        raise BitplanError(f"cannot quantize non-finite weights to {type_name}")
    imatrix_ptr = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, np.float32)
        imatrix_ptr = importance.ctypes.data
    out = np.zeros((rows.shape[0], _row_bytes(ggml_type, rows.shape[1])), np.uint8)
    lib.ggml_quantize_init(int(ggml_type))  # builds the i-quants' grids once; else a no-op
    written = lib.ggml_quantize_chunk(
        int(ggml_type), rows.ctypes.data, out.ctypes.data, 0, *rows.shape, imatrix_ptr
    )
    if written != out.nbytes:
        raise BitplanError(f"ggml wrote {written} bytes of {type_name}, expected {out.nbytes}")
    return out


def ggml_dequantize_rows(data: np.ndarray, type_name: str, row_length: int) -> np.ndarray:
    """ggml's own ``dequantize_row_*`` of ``data`` (n_rows, row_bytes): float32 (n_rows,
    row_length). bitplan dequantizes with the ``gguf`` package; this checks it."""
    data = np.ascontiguousarray(data, np.uint8)
    out = np.zeros((data.shape[0], row_length), np.float32)
    # ggml spells the k-quants with a capital K: dequantize_row_q4_K.
    name = type_name.lower().replace("_k", "_K")
    fn = getattr(_library(), f"dequantize_row_{name}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(data.ctypes.data, out.ctypes.data, out.size)
    return out


__all__ = ["ggml_available", "ggml_dequantize_rows", "ggml_quantize_rows"]
