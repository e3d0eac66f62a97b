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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import StepState
from .centering import sinkhorn_knopp
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

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 weight: float = 1.0, centering: str = "ema") -> None:
        super().__init__()
        if centering not in ("ema", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.weight = weight
        self.centering = centering
        self.register_buffer("patch_center", torch.zeros(1, 1, out_dim))

    def terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              masks: torch.Tensor | None, state: StepState) -> dict[str, torch.Tensor]:
        """The step's interface: the student's masked patch logits against the teacher's."""
        if masks is None:
            raise ValueError("the patch objective needs the step's patch masks")
        out = self(student["patch_masked"], teacher["patch_masked"], teacher["patch_mean"], masks,
                   state.patch_teacher_temp)
        return {"loss": out["patch"] * self.weight, **out}

    def forward(self, student_masked: torch.Tensor, teacher_masked: torch.Tensor, teacher_mean: torch.Tensor,
                masks: torch.Tensor, teacher_temp: float) -> dict[str, torch.Tensor]:
        """Loss over the masked patches; updates the patch center afterwards (EMA centering).

        Args:
            student_masked: (M, K) student logits of the M masked patches, in ``masks.nonzero()`` order.
            teacher_masked: (M, K) teacher logits of the same patches of the unmasked global views.
            teacher_mean: (1, K) the teacher's mean logit vector over every patch of its G*B views
                (what iBOT's center averages; see :meth:`MultiCropModel.patch_targets`).
            masks: (G*B, P) bool, True where the student's patch was masked; M = masks.sum().
            teacher_temp: the patch teacher temperature of this iteration.
        Returns:
            {"patch": scalar loss, "mask_ratio": fraction of masked patches (detached),
             "patch_teacher_entropy", "patch_teacher_kl_uniform": the collapse monitors of
             :func:`~ssl_distill.objectives.dino.teacher_statistics` over the M masked patches' targets
             (zero when nothing is masked)}.
        """
        teacher_masked = teacher_masked.float()
        if self.centering == "sinkhorn_knopp":
            targets = sinkhorn_knopp(teacher_masked, teacher_temp, rows_differ_across_ranks=True)
        else:
            targets = F.softmax((teacher_masked - self.patch_center[0]) / teacher_temp, dim=-1)
        log_p = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)
        per_patch = -(targets.detach() * log_p).sum(-1)  # (M,)
        image = masks.nonzero()[:, 0]  # the (view, image) row of each masked patch
        per_image = per_patch.new_zeros(masks.shape[0]).index_add(0, image, per_patch)
        per_image = per_image / masks.sum(-1).clamp(min=1)
        if self.centering == "ema":
            self.update_center(teacher_mean)
        with torch.no_grad():
            stats = teacher_statistics(targets)
        return {"patch": per_image.mean(), "mask_ratio": masks.float().mean().detach(),
                **{f"patch_{k}": v for k, v in stats.items()}}

    @torch.no_grad()
    def update_center(self, teacher_mean: torch.Tensor) -> None:
        """EMA of the mean teacher patch token over patches and images, averaged over ranks
        (every rank holds the same number of patches)."""
        batch_center = teacher_mean.detach().float().reshape(1, -1).clone()  # (1, K)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / world
        self.patch_center.mul_(self.center_momentum).add_(batch_center.unsqueeze(0) * (1 - self.center_momentum))
