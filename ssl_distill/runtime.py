"""Device, precision and the process group: the helpers training and every evaluation share.

Both raise :class:`~ssl_distill.config.ConfigError` with the fix in one sentence, so a run that
cannot work on this machine stops before a folder is scanned or a model is built.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.distributed as dist

from .config import ConfigError


def resolve_device(name: str, key: str = "run.device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; with several processes, ``process_group`` picks the GPU index.

    ``key`` names the setting in the error message (``run.device``, ``--device`` ...).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu or cuda") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but this machine has no usable CUDA GPU (torch.cuda.is_available() "
                          f"is False); use {key}=cpu, or auto to take a GPU when there is one")
    return device


def gemm_seconds(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """Best time of one (n x n) @ (n x n) matmul in ``dtype`` on the CPU (after one warm-up).

    The operands come from a generator of their own: the global RNG (drop path, a resumed run's restored
    state) must not depend on whether this process has timed the CPU before."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def bf16_is_faster_on_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices faster than float32 ones, measured (~0.1 s).

    AMX and AVX512-BF16 machines do (2-6x); CPUs that only emulate bfloat16 are about 2x slower
    in it, and there autocast to bf16 would slow training down.
    """
    return gemm_seconds(torch.bfloat16) < gemm_seconds(torch.float32)


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` -> ``bf16`` on CUDA and on CPUs where bf16 matmuls are faster (measured), else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and bf16_is_faster_on_cpu()):
        return "bf16"
    return "fp32"


def check_precision(device: torch.device, precision: str, key: str = "run.precision") -> None:
    """fp16 needs CUDA (its loss scaler and kernels); bf16, fp32 and auto run everywhere."""
    if precision not in ("fp32", "bf16", "fp16", "auto"):
        raise ConfigError(f"{key} must be fp32, bf16, fp16 or auto, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"{key}=fp16 needs a CUDA GPU and this run is on {device.type}; use {key}=bf16 "
                          "(the fast option on CPU) or fp32")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (AMX / AVX512-BF16) and CUDA, fp16 on CUDA, nothing for fp32."""
    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def is_distributed() -> bool:
    """True inside a process group (torchrun, SLURM, submitit): collectives then span every rank."""
    return dist.is_available() and dist.is_initialized()
