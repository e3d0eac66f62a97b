"""Per-iteration schedules (DINO's ``cosine_scheduler`` and the teacher-temperature warmup)."""
from __future__ import annotations

import math

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warmup from ``warmup_start`` to ``base``, then half-cosine from ``base`` to ``final``.

    Returns an array of length ``epochs * iters_per_epoch``, value at iteration i (as DINO's
    ``utils.cosine_scheduler``).
    """
    total = epochs * iters_per_epoch
    warmup_iters = min(int(round(warmup_epochs * iters_per_epoch)), total)
    warmup = np.linspace(warmup_start, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    sched = np.concatenate((warmup, cosine))
    assert len(sched) == total
    return sched


def teacher_temp_schedule(
    warmup_temp: float, temp: float, warmup_epochs: float, epochs: int, iters_per_epoch: int
) -> np.ndarray:
    """Linear warmup of the teacher temperature, then constant (Caron et al. 2021, Sec. 4.3).

    Per iteration rather than DINO's per-epoch steps (deliberate: short CPU runs of a few epochs
    would otherwise jump in one or two steps); it reaches ``temp`` when warmup ends, as DINO.
    """
    total = epochs * iters_per_epoch
    warm = min(int(round(warmup_epochs * iters_per_epoch)), total)
    return np.concatenate((np.linspace(warmup_temp, temp, warm, endpoint=False), np.full(total - warm, temp)))


def linear_scaled_lr(base_lr: float, total_batch: int) -> float:
    """The linear scaling rule lr = base * batch / 256 (Goyal et al. 2017), as DINO."""
    return base_lr * total_batch / 256.0


def frozen_last_layer(step: int, iters_per_epoch: int, freeze_epochs: float) -> bool:
    """True while the head's last layer is kept fixed (DINO's ``cancel_gradients_last_layer``)."""
    return step < math.ceil(freeze_epochs * iters_per_epoch)
