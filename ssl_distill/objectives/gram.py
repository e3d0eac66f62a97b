"""Gram anchoring: the student's patch similarities held to a Gram teacher's.

Siméoni et al., "DINOv3", 2025 (arXiv:2508.10104), the Gram anchoring loss: with X_S and X_G the
(P, D) L2-normalised patch features of one global view from the student and from the Gram teacher,

    L_Gram = || X_S X_S^T - X_G X_G^T ||_F^2.

The code computes what the official implementation (``dinov3/loss/gram_loss.py``) computes: the **mean**
squared difference over every entry of the Gram matrices, diagonal included (``nn.MSELoss``), not the
paper's summed squared Frobenius norm; the two differ by the constant factor (number of entries).
Per image (``img_level``: one P x P matrix per global view, the mean over all G*B*P*P entries) or
over the batch (one (G*B*P) x (G*B*P) matrix of every patch of every global view).

Negative entries, as the official options: ``remove_neg`` clamps both matrices' negative entries to 0;
``remove_only_teacher_neg`` clamps the teacher's, then zeroes the student's entries where both are
negative. The official code tests that on the already clamped teacher matrix, so the second step
never zeroes anything: only the teacher is clamped. That is reproduced here, and said so.

The student's features are its final-norm patch tokens of the global views (``"patch_global"``), with
the step's patch masks applied when a masked-patch term runs (as ``ssl_meta_arch.py`` feeds Gram the
masked student forward); the teacher's are the Gram teacher's final-norm patch tokens of the same
views (the live EMA teacher's ``"patch_global"``, or a frozen Gram teacher's ``"gram_patch"`` on its own
crops). A teacher grid that differs from the student's (Gram crops at 2x the resolution) is resized to
the student's grid bicubically, ``align_corners=False``, without antialiasing, as the official code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reads, StepState


def resize_patch_grid(patches: torch.Tensor, side: int) -> torch.Tensor:
    """(N, P_t, D) patch tokens of square grids -> (N, side * side, D), resized bicubically.

    ``F.interpolate(..., mode="bicubic", align_corners=False, antialias=False)`` on the (N, D, s_t, s_t)
    grid, as DINOv3's Gram teacher features are brought to the student's grid.
    """
    n, p, d = patches.shape
    source = math.isqrt(p)
    if source * source != p:
        raise ValueError(f"the Gram teacher's {p} patch tokens are not a square grid")
    grid = patches.transpose(1, 2).reshape(n, d, source, source)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False, antialias=False)
    return grid.flatten(2).transpose(1, 2)


def gram_matrices(features: torch.Tensor, img_level: bool, normalized: bool) -> torch.Tensor:
    """(N, P, D) features -> (N, P, P) per-image Gram matrices, or (N*P, N*P) over the batch, in fp32."""
    x = features.float()
    if normalized:
        x = F.normalize(x, dim=-1)
    if not img_level:
        x = x.flatten(0, 1)
    return x @ x.transpose(-1, -2)


def mean_patch_similarity(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of two different patches of one view: (N, P, D) -> scalar (detached).

    For unit vectors, sum_{i != j} <x_i, x_j> = ||sum_i x_i||^2 - sum_i ||x_i||^2: no P x P matrix is
    formed. Near 1: every patch of a view has the same feature (dense collapse); the Gram teacher's
    value is the level the term holds the student to.
    """
    x = F.normalize(features.detach().float(), dim=-1)
    p = x.shape[1]
    if p < 2:
        return x.new_zeros(())
    off_diagonal = x.sum(1).square().sum(-1) - x.square().sum((1, 2))
    return (off_diagonal / (p * (p - 1))).mean()


class GramLoss(nn.Module):
    """The Gram anchoring term (see the module docstring).

    Args:
        img_level: one Gram matrix per view (True) or one over the batch (False).
        normalized: L2-normalise the features first (the official ``gram.normalized``, default True).
        remove_neg: clamp both matrices' negative entries to 0.
        remove_only_teacher_neg: the official variant that clamps the teacher's (see the module docstring).
        target: the teacher output read: ``"gram_patch"`` (a frozen Gram teacher on its own crops) or
            ``"patch_global"`` (the live EMA teacher's patch tokens of the global views).
        compute_stats: also log the official statistics ``gram_masked`` / ``gram_unmasked``: the loss of
            one batch-level Gram matrix over the masked, and over the unmasked, patches (the term's
            weight is not applied; needs the step's patch masks, else left out).
    """

    loss_terms = ("gram",)
    collapse_keys = ()

    def __init__(self, img_level: bool = True, normalized: bool = True, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False, target: str = "gram_patch",
                 compute_stats: bool = False) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg exclude each other")
        if target not in ("gram_patch", "patch_global"):
            raise ValueError(f"target must be 'gram_patch' or 'patch_global', got {target!r}")
        self.img_level = img_level
        self.normalized = normalized
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg
        self.target = target
        self.compute_stats = compute_stats
        self.reads = Reads(student=("patch_global",), teacher=(target,))

    def terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              masks: torch.Tensor | None, state: StepState) -> dict[str, torch.Tensor]:
        """The step's interface: ``"gram"`` (unweighted) and the monitors, the loss weighted by
        ``state.gram_weight``. While that weight is 0 the Gram teacher is not run: only the student's
        patch similarity is logged."""
        ours = student["patch_global"]
        out = {"gram_student_patch_sim": mean_patch_similarity(ours)}
        if state.gram_weight == 0:
            return {"loss": ours.new_zeros((), dtype=torch.float32), **out}
        target = teacher[self.target]
        if target.shape[1] != ours.shape[1]:
            target = resize_patch_grid(target, math.isqrt(ours.shape[1]))
        loss = self(ours, target)
        out["gram_teacher_patch_sim"] = mean_patch_similarity(target)
        if self.compute_stats and masks is not None:
            with torch.no_grad():
                for name, where in (("gram_masked", masks), ("gram_unmasked", ~masks)):
                    out[name] = self._batch_level(ours.detach()[where], target[where])
        return {"loss": loss * state.gram_weight, "gram": loss, **out}

    def _batch_level(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The loss of one Gram matrix over the rows of (M, D) features (official ``img_level=False``)."""
        return self(student.unsqueeze(0), teacher.unsqueeze(0), img_level=False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, img_level: bool | None = None) -> torch.Tensor:
        """Mean squared difference of the Gram matrices (scalar, fp32).

        Args:
            student: (N, P, D) student patch features (N = G*B global views).
            teacher: (N, P, D') Gram teacher patch features on the same grid (no gradient flows into them).
            img_level: overrides the module's setting (the batch-level statistics).
        """
        level = self.img_level if img_level is None else img_level
        target = gram_matrices(teacher.detach(), level, self.normalized)
        ours = gram_matrices(student, level, self.normalized)
        if self.remove_neg or self.remove_only_teacher_neg:
            target = target.clamp_min(0.0)
        if self.remove_neg:
            ours = ours.clamp_min(0.0)
        # remove_only_teacher_neg: the official student step zeroes entries where both matrices are
        # negative, tested on the clamped teacher matrix, which has none: nothing more to do
        return F.mse_loss(ours, target)
