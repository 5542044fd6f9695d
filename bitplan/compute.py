"""The dtype bitplan's torch passes compute in, chosen for the device they run on.

bfloat16 halves the cost of a matmul only where the hardware has bfloat16 arithmetic: x86 CPUs
with AVX512-BF16 or AMX, Arm CPUs with the BF16 extension, CUDA GPUs from Ampere on. Elsewhere
torch emulates it: on an AVX2-only server a 1024x640 by 640x2048 matmul took 0.37 s in bfloat16
against 0.09 s in float32, and the default search ran about 80x longer than on the machine it was
tuned on. So ``auto`` measures instead of guessing from CPU flags:

* **CPU**: a one-off micro-benchmark of exactly that matmul as the passes run it (float32 inputs,
  under ``torch.autocast``) against plain float32, cached per machine (CPU model, flags, torch
  version, thread count) in the bitplan cache. bfloat16 is chosen when it is at least
  ``BFLOAT16_MIN_SPEEDUP`` times faster; its rounding costs accuracy, so a tie goes to float32.
* **CUDA**: bfloat16 where the GPU supports it, else float16.

The weights are never converted: passes run under autocast, so only the matmuls (and the ops
autocast lists with them) use the lower precision.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bitplan.atomic import file_lock, write_json_atomic
from bitplan.cache import cache_dir
from bitplan.errors import BitplanError

#: The dtypes a pass may compute in, by the names ``--dtype`` takes.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)

#: bfloat16 must beat float32 by this factor on the micro-benchmark to be chosen on a CPU.
BFLOAT16_MIN_SPEEDUP = 1.25
#: The micro-benchmark's matmul: (tokens x in) by (in x out), the size of a scoring step.
_BENCH_SHAPE = (1024, 640, 2048)
_BENCH_VERSION = 1


@dataclass(frozen=True)
class ComputeDtype:
    """The dtype chosen for a device, and why (printed once, recorded with results)."""

    dtype: torch.dtype
    device: str
    reason: str

    @property
    def name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def describe(self) -> str:
        return f"computing in {self.name} on {self.device}: {self.reason}"


def autocast(device: str | torch.device, dtype: torch.dtype) -> torch.autocast:
    """The context a pass runs in: autocast to ``dtype`` on ``device``, off for float32."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def choose_dtype(device: str | torch.device = "cpu", requested: str = "auto") -> ComputeDtype:
    """The dtype for passes on ``device``: ``requested`` unless it is ``auto``."""
    device = str(device)
    if requested != "auto":
        if requested not in DTYPES:
            raise BitplanError(
                f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}"
            )
        return ComputeDtype(DTYPES[requested], device, "as asked (--dtype)")
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return ComputeDtype(torch.bfloat16, device, "the GPU supports bfloat16")
        return ComputeDtype(torch.float16, device, "the GPU has no bfloat16; float16 instead")
    if kind != "cpu":
        return ComputeDtype(torch.float32, device, f"no rule for {kind} devices: float32")
    speeds = cpu_matmul_speeds()
    speedup = speeds["float32_s"] / speeds["bfloat16_s"]
    measured = (
        f"bfloat16 matmuls {speedup:.2f}x the speed of float32 on this CPU "
        f"({speeds['capability']}; micro-benchmark cached in {speeds['cache_file']})"
    )
    if speedup >= BFLOAT16_MIN_SPEEDUP:
        return ComputeDtype(torch.bfloat16, device, measured)
    return ComputeDtype(torch.float32, device, measured)


def cpu_description() -> dict[str, str]:
    """This CPU's model name, torch's capability level and its bfloat16-related flags."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the model name from platform is all there is
        pass
    bf16_flags = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_flags": ",".join(bf16_flags) or "none",
    }


def cpu_matmul_speeds() -> dict:
    """Seconds of the micro-benchmark matmul in float32 and under bfloat16 autocast, on this
    machine: measured once and cached, since it takes about a second."""
    cpu = cpu_description()
    path, identity = speeds_cache_file(cpu)
    cached = _read_speeds(path, identity)
    if cached is not None:
        return cached
    # One process measures, the others wait and read its result: two measuring at once slow each
    # other down, could choose different dtypes and so miss each other's cached scores.
    with file_lock(path.with_suffix(".lock"), enabled=_writable(path.parent)):
        cached = _read_speeds(path, identity)
        if cached is not None:
            return cached
        result = {**cpu, **_measure(), "threads": torch.get_num_threads()}
        result.update(torch=torch.__version__, identity=identity, cache_file=str(path))
        with contextlib.suppress(OSError):
            write_json_atomic(path, result)
        return result


def speeds_cache_file(cpu: dict[str, str]) -> tuple[Path, str]:
    """Where this machine's micro-benchmark is cached, and the identity stored in it."""
    identity = json.dumps(
        [_BENCH_VERSION, cpu, torch.__version__, torch.get_num_threads()], sort_keys=True
    )
    digest = hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()
    return cache_dir() / "machine" / f"cpu-dtype-{digest}.json", identity


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and can be written (a read-only cache only costs
    a re-measurement later)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _read_speeds(path: Path, identity: str) -> dict | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or damaged: measure again
    return cached if isinstance(cached, dict) and cached.get("identity") == identity else None


def _measure(repeats: int = 5) -> dict[str, float]:
    tokens, inputs, outputs = _BENCH_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, inputs, generator=generator)
    w = torch.randn(outputs, inputs, generator=generator)

    def best_of(dtype: torch.dtype) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            torch.nn.functional.linear(x, w)  # warm-up: kernel selection, allocations
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best = min(best, time.perf_counter() - start)
        return best

    return {"float32_s": best_of(torch.float32), "bfloat16_s": best_of(torch.bfloat16)}
