"""Exponential moving average of the student into the teacher (Caron et al. 2021, Sec. 3.1)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s, for every parameter pair (same order).

    ``student`` is the unwrapped module (not the DDP wrapper) so every rank updates an identical
    teacher from identical, already all-reduced student weights.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
