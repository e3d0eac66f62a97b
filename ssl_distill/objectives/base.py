"""What every objective declares, receives and returns in the training step.

An objective is a small ``nn.Module`` with a ``terms`` method::

    terms(student, teacher, masks, state) -> {"loss": weighted scalar, "<name>": scalar, ...}

``student`` / ``teacher`` are the named outputs of :class:`~ssl_distill.models.MultiCropModel`
(``"cls"``, ``"cls_feat"``, ``"patch_masked"``, ``"patch_mean"``, ``"patch_global"`` ...), ``masks`` the (G*B, P) patch
masks of the step (or None), ``state`` the schedule values of this iteration. ``"loss"`` is what
the step adds to the total (the objective applies its own weight); every other 0-d tensor is logged,
detached; a :class:`TeacherRows` entry says what a teacher's collapse monitors were measured on (not
logged: with several processes it makes the logged monitors those of the global batch). Buffers an
objective owns (centers) are saved in the checkpoint under their own names.

Each objective declares what it reads (:class:`Reads`): the engine builds the union of its
objectives' reads (the [CLS] head, patch targets and mask token, the [OBJ] token) and nothing else,
without knowing any objective by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch


@dataclass(frozen=True)
class StepState:
    """Schedule values of one iteration: the step, its (fractional) epoch, the teacher temperatures, and
    Gram anchoring's weights (the Gram term's, and that of the DINO term's local-crop pairs)."""

    step: int
    epoch: float
    teacher_temp: float
    patch_teacher_temp: float
    gram_weight: float = 0.0
    dino_local_weight: float = 1.0


@dataclass(frozen=True)
class Reads:
    """The step outputs an objective reads.

    ``student`` / ``teacher``: names of the networks' outputs: ``"cls"`` (head logits of the [CLS]
    tokens), ``"cls_feat"`` (the backbone's [CLS] tokens), ``"obj"`` ([OBJ] logits),
    ``"patch_masked"`` (logits of the masked patches), ``"patch_mean"`` (teacher: the mean patch
    logit), ``"patch_global"`` (the backbone's final-norm patch tokens of the global views),
    ``"obj_valid"`` (teacher side, from the object-aware crops: which views hold each image's object)
    and ``"gram_patch"`` (teacher side: the frozen Gram teacher's patch tokens of its own crops).
    ``patch_masks``: it reads the step's patch masks (``terms``' ``masks``), so the student sees the
    mask token there and the teacher builds patch targets. ``object_masks``: it reads the [OBJ] token,
    which attends to each crop's object mask.
    """

    student: tuple[str, ...] = ()
    teacher: tuple[str, ...] = ()
    patch_masks: bool = False
    object_masks: bool = False

    @staticmethod
    def union(reads: Iterable[Reads]) -> Reads:
        """What a step with all of these objectives must build."""
        reads = list(reads)
        return Reads(student=tuple(sorted({name for r in reads for name in r.student})),
                     teacher=tuple(sorted({name for r in reads for name in r.teacher})),
                     patch_masks=any(r.patch_masks for r in reads), object_masks=any(r.object_masks for r in reads))


@dataclass(frozen=True)
class TeacherRows:
    """What one teacher's collapse monitors (``entropy``, ``kl_uniform``: their logged names) were measured
    on in a step: ``rows`` teacher distributions whose mean is ``mean_p`` (K,).

    The step's log reads it only with several processes, at the logging step: the logged entropy is then
    the mean over every rank's rows (each rank's value weighted by its ``rows``), and the KL to uniform is
    recomputed from the rows-weighted mean of the ranks' ``mean_p``, so that 1 process x batch B and
    2 x B/2 log the same monitors (ranks hold different numbers of masked patches and valid [OBJ] views).
    """

    rows: int
    mean_p: torch.Tensor
    entropy: str
    kl_uniform: str


class Objective(Protocol):
    """See the module docstring."""

    loss_terms: tuple[str, ...]  # the names of its terms that enter "loss" (named in a NaN report)
    reads: Reads
    # its teacher's collapse monitors, (entropy, KL to uniform) as logged, or () without a teacher
    # distribution; the run watches the first objective's that has them
    collapse_keys: tuple[str, ...]

    def terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              masks: torch.Tensor | None, state: StepState) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...
