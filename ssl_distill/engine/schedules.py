"""Per-iteration schedules (DINO's ``cosine_scheduler``, the teacher-temperature warmup, DINOv3's Gram ramp)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import Config


#: the settings a run's per-iteration schedules and data order are computed from (:meth:`Schedules.from_config`,
#: the epoch sampler); a resume continues them, so they cannot change mid-run. ``optim.betas`` is here too: the
#: optimizer state a resume loads brings the old betas back, so a change would do nothing.
SCHEDULE_KEYS = (
    "data.batch_size", "run.seed", "optim.epochs", "optim.lr", "optim.min_lr", "optim.warmup_epochs",
    "optim.weight_decay", "optim.weight_decay_end", "optim.freeze_last_layer", "optim.freeze_backbone_steps",
    "optim.momentum_teacher", "optim.momentum_teacher_end", "optim.betas", "dino.teacher_temp",
    "dino.warmup_teacher_temp", "dino.warmup_teacher_temp_epochs", "ibot.teacher_temp", "ibot.warmup_teacher_temp",
    "masking.pred_start_epoch",
)


def total_iterations(epochs: float, iters_per_epoch: int) -> int:
    """Iterations of a run of ``epochs`` epochs; a fractional count ends mid-epoch (how runs of
    different methods get the same wall-clock budget)."""
    return int(round(epochs * iters_per_epoch))


def cosine_schedule(
    base: float,
    final: float,
    epochs: float,
    iters_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warmup from ``warmup_start`` to ``base``, then half-cosine from ``base`` to ``final``.

    Returns an array of length ``total_iterations(epochs, iters_per_epoch)``, value at iteration i
    (as DINO's ``utils.cosine_scheduler``).
    """
    total = total_iterations(epochs, iters_per_epoch)
    warmup_iters = min(int(round(warmup_epochs * iters_per_epoch)), total)
    warmup = np.linspace(warmup_start, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    sched = np.concatenate((warmup, cosine))
    assert len(sched) == total
    return sched


def teacher_temp_schedule(
    warmup_temp: float, temp: float, warmup_epochs: float, epochs: float, iters_per_epoch: int,
    start_epochs: float = 0,
) -> np.ndarray:
    """Linear warmup of the teacher temperature, then constant (Caron et al. 2021, Sec. 4.3).

    Per iteration rather than DINO's per-epoch steps (deliberate: short CPU runs of a few epochs
    would otherwise jump in one or two steps); it reaches ``temp`` when warmup ends, as DINO.
    ``start_epochs`` holds ``warmup_temp`` that long before the warmup begins (iBOT's patch
    temperature with ``pred_start_epoch``).
    """
    total = total_iterations(epochs, iters_per_epoch)
    hold = min(int(round(start_epochs * iters_per_epoch)), total)
    warm = min(int(round(warmup_epochs * iters_per_epoch)), total - hold)
    return np.concatenate((np.full(hold, warmup_temp), np.linspace(warmup_temp, temp, warm, endpoint=False),
                           np.full(total - hold - warm, temp)))


def warmup_cosine_constant(start: float, peak: float, end: float, warmup_iters: int, cosine_iters: int,
                           total: int) -> np.ndarray:
    """DINOv3's ``linear_warmup_cosine_decay`` (``dinov3/train/cosine_lr_scheduler.py``), cut to ``total``.

    ``warmup_iters`` values ``linspace(start, peak, endpoint=False)``, then ``cosine_iters`` values of a
    half cosine from ``peak`` to ``end`` (both ends included: ``cos(linspace(0, pi, cosine_iters))``), then
    ``end`` to the last iteration. The Gram weight is ``(0, 0, w)``: 0 until the start step, a cosine
    ramp to w, then w; the DINO local-crop weight is ``(1, 1, w_local)``.
    """
    warmup = np.linspace(start, peak, warmup_iters, endpoint=False)
    cosine = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine_iters)) + 1) / 2 + end
    constant = np.full(max(total - warmup_iters - cosine_iters, 0), end, dtype=np.float64)
    return np.concatenate((warmup, cosine, constant))[:total]


def linear_scaled_lr(base_lr: float, total_batch: int) -> float:
    """The linear scaling rule lr = base * batch / 256 (Goyal et al. 2017), as DINO."""
    return base_lr * total_batch / 256.0


def frozen_last_layer(step: int, iters_per_epoch: int, freeze_epochs: float) -> bool:
    """True while the head's last layer is kept fixed (DINO's ``cancel_gradients_last_layer``)."""
    return step < math.ceil(freeze_epochs * iters_per_epoch)


@dataclass
class Schedules:
    """Per-iteration values for the whole run (arrays of length epochs * iters_per_epoch)."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    patch_teacher_temp: np.ndarray
    gram_weight: np.ndarray
    dino_local_weight: np.ndarray
    iters_per_epoch: int
    freeze_last_layer: float

    @classmethod
    def from_config(cls, cfg: Config, iters_per_epoch: int, world: int) -> "Schedules":
        o, d, p, g = cfg.optim, cfg.dino, cfg.ibot, cfg.gram
        base_lr = linear_scaled_lr(o.lr, cfg.data.batch_size * world)
        total = total_iterations(o.epochs, iters_per_epoch)
        return cls(
            lr=cosine_schedule(base_lr, o.min_lr, o.epochs, iters_per_epoch, o.warmup_epochs),
            wd=cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, iters_per_epoch),
            momentum=cosine_schedule(o.momentum_teacher, o.momentum_teacher_end, o.epochs, iters_per_epoch),
            teacher_temp=teacher_temp_schedule(
                d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs, o.epochs, iters_per_epoch
            ),
            patch_teacher_temp=teacher_temp_schedule(
                p.warmup_teacher_temp, p.teacher_temp, d.warmup_teacher_temp_epochs, o.epochs, iters_per_epoch,
                start_epochs=cfg.masking.pred_start_epoch,
            ),
            gram_weight=warmup_cosine_constant(0.0, 0.0, g.weight, g.start_step, g.ramp_steps, total),
            dino_local_weight=warmup_cosine_constant(1.0, 1.0, g.dino_local_weight, g.start_step, g.ramp_steps, total),
            iters_per_epoch=iters_per_epoch,
            freeze_last_layer=o.freeze_last_layer,
        )
