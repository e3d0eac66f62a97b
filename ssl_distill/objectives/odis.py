"""ODIS object-level self-distillation: the [OBJ] term.

Hızlı, Yıldız, Marttinen, "Object-level Self-Distillation for Vision Pretraining", 2025 (arXiv
2506.05409). Read: its abstract and introduction (object-aware cropping and masked attention turn a
scene-level task into object-level ones), the co-author's project page (cagatayyildiz.github.io/projects/odis:
an [OBJ] token replaces [CLS] as the distilled summary; its teacher center is a momentum mean of the
teacher's [OBJ] outputs, all-reduced over ranks) and ``KarahanS/Cross-Time-Self-Distillation``, which
builds on ODIS. The method's sections could not be read; the loss below is our reading of "DINO's
objective on [OBJ]": DINO's cross-view cross-entropy (Caron et al. 2021, Eq. 1-3) applied to the [OBJ]
outputs instead of the [CLS] outputs: the teacher's [OBJ] distribution on global view i, centered and
sharpened, is the target of the student's [OBJ] distribution on every other view v,

    L_OBJ = 1 / n_pairs * sum_{i < G} sum_{v != i} 1/B sum_b w_{b,i,v} H(P_t(obj_{b,i}), P_s(obj_{b,v})),

with w_{b,i,v} = 1 when both views i and v of image b hold the target object and 0 otherwise. An
invalid pair adds zero and still counts in the 1/B mean, as iBOT's images without a masked patch
count in its patch term's mean: a batch with few valid objects gives a proportionally smaller term
(no per-batch reweighting that would make one valid image carry a whole batch's gradient).

The [OBJ] term has its own center (EMA, momentum 0.9, like DINO's Eq. 4), updated after the loss
from the teacher's [OBJ] outputs of the valid views only (an [OBJ] without its object says nothing
about the object distribution), sums and counts all-reduced over ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reads, StepState
from .center import Center
from .dino import teacher_statistics


class ObjectLoss(nn.Module):
    """Cross-view cross-entropy of [OBJ] outputs over valid (teacher view, student view) pairs.

    Args:
        out_dim: K, prototypes of the head the [OBJ] token goes through (the shared CLS head).
        n_crops: V, student views (globals first).
        n_global: G, teacher (global) views.
        student_temp: tau_s (0.1).
        center_momentum: momentum of the [OBJ] center (0.9).
        weight: the term's weight in the total loss.
    """

    loss_terms = ("obj",)
    reads = Reads(student=("obj",), teacher=("obj", "obj_valid"), object_masks=True)
    collapse_keys = ("obj_teacher_entropy", "obj_teacher_kl_uniform")

    def __init__(self, out_dim: int, n_crops: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9, weight: float = 1.0) -> None:
        super().__init__()
        self.centering = Center("ema", center_momentum)
        self.n_crops = n_crops
        self.n_global = n_global
        self.student_temp = student_temp
        self.weight = weight
        self.register_buffer("obj_center", torch.zeros(1, out_dim))

    def terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              masks: torch.Tensor | None, state: StepState) -> dict[str, torch.Tensor]:
        """The step's interface: [OBJ] logits of all views; ``teacher["obj_valid"]`` (B, V) says which
        views hold the target object (from the object-aware crops)."""
        out = self(student["obj"], teacher["obj"], teacher["obj_valid"], state.teacher_temp,
                   valid_rows=teacher.get("obj_valid_rows"))
        return {"loss": out["obj"] * self.weight, **out}

    def forward(self, student_obj: torch.Tensor, teacher_obj: torch.Tensor, valid: torch.Tensor,
                teacher_temp: float, valid_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss and teacher statistics; updates the [OBJ] center afterwards.

        Args:
            student_obj: (V*B, K) student [OBJ] logits, crop-major.
            teacher_obj: (G*B, K) teacher [OBJ] logits of the G global views, crop-major.
            valid: (B, V) bool, True where view v of image b holds the target object.
            teacher_temp: tau_t of this iteration (the [CLS] teacher's schedule).
            valid_rows: the rows g*B + b of the valid teacher views (v = g < G), computed on the host from the
                loader's ``valid`` (the step's ``teacher["obj_valid_rows"]``); None: a boolean index of
                ``valid``, which waits for the device on a GPU.
        Returns:
            {"obj": scalar loss, "obj_valid_pairs": fraction of (image, pair) terms that count,
             "obj_teacher_entropy", "obj_teacher_kl_uniform": collapse monitors of the valid
             teacher rows (nats) and their "obj_teacher_rows", absent when no view is valid}; all but "obj"
             detached.
        """
        k = student_obj.shape[-1]
        b = valid.shape[0]
        w = valid.t().float()  # (V, B)
        logp = F.log_softmax(student_obj.float() / self.student_temp, dim=-1).view(self.n_crops, b, k)
        teacher_obj = teacher_obj.float()
        q = self.centering.targets(teacher_obj, self.obj_center, teacher_temp).view(self.n_global, b, k)
        weighted_sum = (w.unsqueeze(-1) * logp).sum(0)  # (B, K): sum over valid student views of log p_v
        total = student_obj.new_zeros((), dtype=torch.float32)
        counted = student_obj.new_zeros((), dtype=torch.float32)
        n_terms = 0
        for i in range(self.n_global):
            others = weighted_sum - w[i].unsqueeze(-1) * logp[i]  # every valid view but i itself
            total = total - (w[i] * (q[i] * others).sum(-1)).mean()
            counted = counted + (w[i] * (w.sum(0) - w[i])).sum()
            n_terms += self.n_crops - 1
        loss = total / n_terms
        teacher_valid = w[: self.n_global].reshape(-1) > 0
        rows = q.view(-1, k)
        with torch.no_grad():
            stats = teacher_statistics(rows[teacher_valid] if valid_rows is None else rows.index_select(0, valid_rows),
                                       prefix="obj_")
        # the valid rows only; no update when no rank has one
        self.centering.update(self.obj_center, (teacher_obj * teacher_valid.unsqueeze(-1)).sum(0), teacher_valid.sum())
        return {"obj": loss, "obj_valid_pairs": (counted / (n_terms * b)).detach(),
                **stats}
