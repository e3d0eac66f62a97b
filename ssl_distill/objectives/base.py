"""What every objective receives and returns in the training step.

An objective is a small ``nn.Module`` with a ``terms`` method::

    terms(student, teacher, masks, state) -> {"loss": weighted scalar, "<name>": scalar, ...}

``student`` / ``teacher`` are the named outputs of :class:`~ssl_distill.models.MultiCropModel`
(``"cls"``, ``"cls_feat"``, ``"patch_masked"``, ``"patch_mean"`` ...), ``masks`` the (G*B, P) patch
masks of the step (or None), ``state`` the schedule values of this iteration. ``"loss"`` is what
the step adds to the total (the objective applies its own weight); every other entry is logged,
detached. Buffers an objective owns (centers) are saved in the checkpoint under their own names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class StepState:
    """Schedule values of one iteration: the step, its (fractional) epoch and the teacher temperatures."""

    step: int
    epoch: float
    teacher_temp: float
    patch_teacher_temp: float


class Objective(Protocol):
    """See the module docstring."""

    loss_terms: tuple[str, ...]  # the names of its terms that enter "loss" (named in a NaN report)

    def terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              masks: torch.Tensor | None, state: StepState) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...
