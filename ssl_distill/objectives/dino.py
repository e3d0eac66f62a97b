"""DINO image-level self-distillation loss.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, Eq. (1)-(3):
the teacher distribution is P_t = softmax((g_t(x) - c) / tau_t) on the global views only, the
student's is P_s = softmax(g_s(x') / tau_s) on all views, and the loss is the cross-entropy
H(P_t(x), P_s(x')) averaged over every (teacher view, student view) pair of *different* views.
The center c is an EMA of the teacher's batch mean (Eq. 4), updated after the loss.

With ``centering="sinkhorn_knopp"`` the teacher distribution is DINOv2's Sinkhorn-Knopp assignment
instead (Oquab et al. 2024, Sec. 4; :class:`~ssl_distill.objectives.center.Center`) and the center
is not used. iBOT's [CLS] term (Zhou et al. 2022, Eq. 3, weight lambda1) is this loss.

DINOv3's Gram stage (Siméoni et al. 2025; official ``dino.reweight_dino_local_loss``) weighs the
pairs of a global teacher view and a local student view by ``local_weight`` (1 -> 0.5 along the Gram
ramp): with S_global and S_local the sums of those pairs' cross-entropies and n the number of pairs,
the loss is (S_global + local_weight * S_local) / n, which is the official
(global_terms * L_global + local_w * local_terms * L_local) / (global_terms + local_terms). At weight 1
the term is computed exactly as without the reweighting.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reads, StepState, TeacherRows
from .center import Center


class DINOLoss(nn.Module):
    """Cross-view cross-entropy with teacher centering and sharpening.

    Args:
        out_dim: K, number of prototypes.
        n_crops: V, number of student views (globals first).
        n_global: number of teacher (global) views.
        student_temp: tau_s (0.1 in the paper).
        center_momentum: m in c <- m c + (1 - m) mean(teacher) (0.9 in the paper).
        weight: the term's weight in the total loss (iBOT's lambda1; 1 for DINO).
        centering: ``"ema"`` (DINO, iBOT) or ``"sinkhorn_knopp"`` (DINOv2, 3 iterations).
    """

    loss_terms = ("dino",)
    reads = Reads(student=("cls",), teacher=("cls",))
    collapse_keys = ("teacher_entropy", "teacher_kl_uniform")

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        weight: float = 1.0,
        centering: str = "ema",
    ) -> None:
        super().__init__()
        self.centering = Center(centering, center_momentum)
        self.out_dim = out_dim
        self.n_crops = n_crops
        self.n_global = n_global
        self.student_temp = student_temp
        self.weight = weight
        self.register_buffer("center", torch.zeros(1, out_dim))

    def terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              masks: torch.Tensor | None, state: StepState) -> dict[str, torch.Tensor]:
        """The step's interface (see :mod:`~ssl_distill.objectives.base`): CLS logits of all views."""
        # dino_local_weight is 1 but in DINOv3's Gram stage, and forward then computes DINO's own term
        out = self(student["cls"], teacher["cls"], state.teacher_temp, local_weight=state.dino_local_weight)
        return {"loss": out["dino"] * self.weight, **out}

    def teacher_probabilities(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """P_t (G*B, K): centered and sharpened softmax, or the Sinkhorn-Knopp assignment."""
        return self.centering.targets(teacher_out, self.center, teacher_temp)

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float, local_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Loss and teacher statistics; updates the center afterwards.

        Args:
            student_out: (V * B, K) student logits, crop-major.
            teacher_out: (G * B, K) teacher logits for the G global views, crop-major.
            teacher_temp: tau_t for this iteration.
            local_weight: the weight of the pairs (global teacher view, local student view); see the
                module docstring.
        Returns:
            {"dino": scalar loss, "teacher_entropy": mean per-sample entropy of P_t (nats),
             "teacher_kl_uniform": KL(mean_b P_t || uniform) (nats)}, both detached, and "teacher_rows"
            (:func:`teacher_statistics`).
        """
        student_out = student_out.float()
        teacher_out = teacher_out.float()
        k = student_out.shape[-1]
        student_logp = F.log_softmax(student_out / self.student_temp, dim=-1).view(self.n_crops, -1, k)
        teacher_p = self.teacher_probabilities(teacher_out, teacher_temp)
        teacher_chunks = teacher_p.chunk(self.n_global)

        # sum_{v != i} H(q_i, p_v) = -<q_i, S - log p_i> with S = sum_v log p_v: the same terms as
        # DINO's double loop, computed with one pass over the student views instead of G * V.
        if local_weight == 1.0:
            log_sum = student_logp.sum(0)  # (B, K)
        else:  # the global views' sum here, the local views' below with their weight
            log_sum = student_logp[: self.n_global].sum(0)
            local_sum = student_logp[self.n_global :].sum(0)
        total = student_out.new_zeros(())
        n_terms = 0
        for iq, q in enumerate(teacher_chunks):
            others = log_sum - student_logp[iq] if iq < self.n_crops else log_sum
            total = total - torch.sum(q * others, dim=-1).mean()
            if local_weight != 1.0:
                total = total - local_weight * torch.sum(q * local_sum, dim=-1).mean()
            n_terms += self.n_crops - (1 if iq < self.n_crops else 0)
        loss = total / n_terms

        with torch.no_grad():
            stats = teacher_statistics(teacher_p)
        self.centering.update(self.center, teacher_out.sum(0), len(teacher_out))  # Eq. 4, after the loss
        return {"dino": loss, **stats}


def teacher_statistics(p: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor | TeacherRows]:
    """Collapse monitors for teacher probabilities p (N, K), named ``prefix + "teacher_..."``.

    ``teacher_entropy`` = mean_n H(p_n): near log K means uniform collapse, near 0 means sharp
    outputs. ``teacher_kl_uniform`` = KL(mean_n p_n || U) = log K - H(mean p): near log K means
    every sample picks the same prototype (one-dimension collapse), near 0 a spread-out batch.
    ``teacher_rows``: what they were measured on (:class:`~ssl_distill.objectives.base.TeacherRows`), for
    the log's reduction over processes. An empty p (N = 0: no masked patch, no valid [OBJ] view in the
    batch) gives none: nothing was measured, and a 0 would read as a perfectly sharp teacher (the step's log
    leaves them out).
    """
    if p.shape[0] == 0:
        return {}
    k = p.shape[-1]
    logp = torch.log(p.clamp_min(1e-30))
    entropy = -(p * logp).sum(-1).mean()
    mean_p = p.mean(0)
    kl = math.log(k) + (mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()
    names = {name: prefix + name for name in ("teacher_entropy", "teacher_kl_uniform", "teacher_rows")}
    return {names["teacher_entropy"]: entropy.detach(), names["teacher_kl_uniform"]: kl.detach(),
            names["teacher_rows"]: TeacherRows(p.shape[0], mean_p.detach(), names["teacher_entropy"],
                                               names["teacher_kl_uniform"])}
