"""iBOT masked-image self-distillation: the patch term.

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022, Eq. (2):
L_MIM = -sum_i m_i P_t(u_i)^T log P_s(u_hat_i), where the student sees view u with the masked patch
embeddings replaced by a learned token (u_hat) and the teacher sees the unmasked view u; the
teacher's patch token i of view v is the target of the student's patch token i of the same view v.
As ``main_ibot.py``: per image, the sum over masked positions divided by their count (at least 1,
so an image without masked patches adds zero), then the mean over images and global views. The
teacher side has its own center (momentum 0.9, the mean over all teacher patch tokens, all-reduced)
and its own temperature schedule; ``total = lambda1 * L_[CLS] + lambda2 * L_MIM``
(:class:`~ssl_distill.objectives.dino.DINOLoss` is the [CLS] term).

With ``centering="sinkhorn_knopp"`` (DINOv2, Oquab et al. 2024, Sec. 4) the teacher targets of the
masked patches are their Sinkhorn-Knopp assignment over all ranks' masked patches, as DINOv2's
``iBOTPatchLoss.sinkhorn_knopp_teacher``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reads, StepState
from .center import Center
from .dino import teacher_statistics


class PatchLoss(nn.Module):
    """Masked patch distillation of the global views (iBOT's L_MIM).

    Args:
        out_dim: K_p, prototypes of the patch head (iBOT's ``patch_out_dim``; the CLS head's
            ``out_dim`` when the head is shared).
        student_temp: tau_s (0.1).
        center_momentum: momentum of the patch center (iBOT's ``center_momentum2``, 0.9).
        weight: lambda2 in the total loss (1.0 in iBOT).
        centering: ``"ema"`` (iBOT) or ``"sinkhorn_knopp"`` (DINOv2).
    """

    loss_terms = ("patch",)
    reads = Reads(student=("patch_masked",), teacher=("patch_masked", "patch_mean"), patch_masks=True)
    collapse_keys = ("patch_teacher_entropy", "patch_teacher_kl_uniform")

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 weight: float = 1.0, centering: str = "ema") -> None:
        super().__init__()
        # Sinkhorn-Knopp over the masked patches, whose number differs between ranks
        self.centering = Center(centering, center_momentum, rows_differ_across_ranks=True)
        if centering != "ema":  # no center to update: the teacher's head runs on the masked patches only
            self.reads = Reads(student=("patch_masked",), teacher=("patch_masked",), patch_masks=True)
        self.student_temp = student_temp
        self.weight = weight
        self.register_buffer("patch_center", torch.zeros(1, 1, out_dim))

    def terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              masks: torch.Tensor | None, state: StepState) -> dict[str, torch.Tensor]:
        """The step's interface: the student's masked patch logits against the teacher's."""
        if masks is None:
            raise ValueError("the patch objective needs the step's patch masks")
        out = self(student["patch_masked"], teacher["patch_masked"], teacher.get("patch_mean"), masks,
                   state.patch_teacher_temp, positions=teacher.get("patch_positions"))
        return {"loss": out["patch"] * self.weight, **out}

    def forward(self, student_masked: torch.Tensor, teacher_masked: torch.Tensor, teacher_mean: torch.Tensor | None,
                masks: torch.Tensor, teacher_temp: float,
                positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss over the masked patches; updates the patch center afterwards (EMA centering).

        Args:
            student_masked: (M, K) student logits of the M masked patches, in ``masks.nonzero()`` order.
            teacher_masked: (M, K) teacher logits of the same patches of the unmasked global views.
            teacher_mean: (1, K) the teacher's mean logit vector over every patch of its G*B views
                (what iBOT's center averages; see :meth:`MultiCropModel.patch_targets`); None with
                Sinkhorn-Knopp centering, which has no center.
            masks: (G*B, P) bool, True where the student's patch was masked; M = masks.sum().
            teacher_temp: the patch teacher temperature of this iteration.
            positions: (M,) the flat positions of ``masks``' True entries in (G*B*P), row-major (the step's,
                computed on the host: :meth:`MultiCropModel.patch_targets`); None: ``masks.nonzero()``, which
                waits for the device on a GPU.
        Returns:
            {"patch": scalar loss, "mask_ratio": fraction of masked patches (detached),
             "patch_teacher_entropy", "patch_teacher_kl_uniform": the collapse monitors of
             :func:`~ssl_distill.objectives.dino.teacher_statistics` over the M masked patches' targets
             (absent when nothing is masked: not measured) and their "patch_teacher_rows"}.
        """
        targets = self.centering.targets(teacher_masked.float(), self.patch_center, teacher_temp)
        log_p = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)
        per_patch = -(targets * log_p).sum(-1)  # (M,)
        # the (view, image) row of each masked patch
        image = masks.nonzero()[:, 0] if positions is None else torch.div(positions, masks.shape[1],
                                                                          rounding_mode="floor")
        per_image = per_patch.new_zeros(masks.shape[0]).index_add(0, image, per_patch)
        per_image = per_image / masks.sum(-1).clamp(min=1)
        # each rank's mean over the same number of patches: the mean of the ranks' means is the mean
        if self.centering.method == "ema":
            if teacher_mean is None:
                raise ValueError("EMA centering updates the patch center from the teacher's mean patch logits: "
                                 "give teacher_mean")
            self.centering.update(self.patch_center, teacher_mean, 1)
        with torch.no_grad():
            stats = teacher_statistics(targets, prefix="patch_")
        return {"patch": per_image.mean(), "mask_ratio": masks.float().mean().detach(), **stats}
