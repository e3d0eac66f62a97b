"""Exponential moving average of the student into the teacher (Caron et al. 2021, Sec. 3.1)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, skip: str | None = None) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s, for every parameter pair (same order).

    ``student`` is the unwrapped module (not the DDP wrapper) so every rank updates an identical
    teacher from identical, already all-reduced student weights. ``skip``: a submodule name (``"backbone"``)
    whose parameters are left as they are, for a part the student holds still and the teacher equals: its
    average would be the same values, up to rounding.
    """
    keep = "" if skip is None else skip + "."
    t_params = [p for n, p in teacher.named_parameters() if not (keep and n.startswith(keep))]
    s_params = [p.detach() for n, p in student.named_parameters() if not (keep and n.startswith(keep))]
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
