"""Measured ceilings of this machine (GEMM rates, CPU / GPU model), printed beside every benchmark and
experiment figure (``benchmarks/``, ``experiments/``)."""
from __future__ import annotations

import functools
import os
import platform
import resource
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["cuda_line", "device_sync", "gemm_gflops", "gemm_seconds", "hardware_line", "peak_rss_mib"]


def gemm_seconds(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """Best wall time (s) of one ``(m, k) @ (k, n)`` GEMM in ``dtype`` on the CPU.

    The output is preallocated (``torch.mm(out=...)``) and one warm-up call runs first, so the figure is
    the GEMM itself, not the page faults of a fresh output buffer; best of ``repeats`` calls.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense square GEMM rate (GFLOP/s, ``2 n^3`` flops per call) in ``dtype``, best of ``repeats``."""
    return 2.0 * n**3 / gemm_seconds(n, n, n, dtype, repeats) / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def hardware_line() -> str:
    """One line: CPU model, ISA torch dispatches to, threads, torch version, fp32 / bf16 GEMM GFLOP/s (cached)."""
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        isa = "?"
    fp32 = gemm_gflops(torch.float32)
    bf16 = gemm_gflops(torch.bfloat16)
    return (
        f"cpu={_cpu_model()} isa={isa} cores={os.cpu_count()} torch_threads={torch.get_num_threads()} "
        f"torch={torch.__version__} python={platform.python_version()} "
        f"gemm2048 fp32={fp32:.0f} GFLOP/s bf16={bf16:.0f} GFLOP/s"
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def cuda_tflops(dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured dense square GEMM rate (TFLOP/s) on the current CUDA device: mean of ``repeats`` products
    after three warm-ups, timed with CUDA events."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=gen).to(dtype)
    b = torch.randn(n, n, device="cuda", generator=gen).to(dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2.0 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def device_sync(device: torch.device) -> Callable[[], None]:
    """What a timer calls before reading the clock: a CUDA step returns before its kernels finish, so on a
    GPU wait for them (an unsynchronized time would be too short); nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@functools.lru_cache(maxsize=1)
def cuda_line() -> str:
    """One line: GPU model, torch / CUDA versions, bf16 and fp32 (TF32 off) GEMM TFLOP/s (cached)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = cuda_tflops(torch.float32, n=4096)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    bf16 = cuda_tflops(torch.bfloat16)
    return (f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} cuda={torch.version.cuda} "
            f"cpu_cores={os.cpu_count()} gemm bf16={bf16:.0f} TFLOP/s fp32={fp32:.0f} TFLOP/s (TF32 off)")
