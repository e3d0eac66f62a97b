"""Device and precision: the helpers training and every evaluation share.

Both raise :class:`~ssl_distill.config.ConfigError` with the fix in one sentence, so a run that
cannot work on this machine stops before a folder is scanned or a model is built.
"""
from __future__ import annotations

import contextlib

import torch

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


def check_precision(device: torch.device, precision: str, key: str = "run.precision") -> None:
    """fp16 needs CUDA (its loss scaler and kernels); bf16 and fp32 run everywhere."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"{key} must be fp32, bf16 or fp16, got {precision!r}")
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
