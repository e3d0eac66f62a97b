"""Teacher centering, shared by the [CLS], patch and [OBJ] terms: what keeps a teacher from collapsing.

Two methods turn the teacher's logits t (N, K) into the targets its student learns:

* ``"ema"``, DINO's center (Caron et al., "Emerging Properties in Self-Supervised Vision
  Transformers", ICCV 2021, Eq. 4): targets softmax((t - c) / tau_t); after the loss,
  c <- m c + (1 - m) mean(t), the mean over every rank's rows (their sums and counts are
  all-reduced together, so ranks may hold different numbers of rows).
* ``"sinkhorn_knopp"``, DINOv2's (Oquab et al., "DINOv2: Learning Robust Visual Features without
  Supervision", TMLR 2024, Sec. 4, "Sinkhorn-Knopp centering", after SwAV: Caron et al., NeurIPS
  2020, Sec. 3.1 and Eq. (3)): the targets are Q* = Diag(u) exp(S^T / tau) Diag(v), the assignment
  whose prototype marginals are uniform (1/K each) and whose sample marginals are uniform (1/B each),
  approximated by a few alternating normalisations and rescaled so that each sample's distribution
  sums to one. The center is then kept (zeros, in the checkpoint) but neither read nor updated.

The center c is a buffer of the objective that owns it, saved in the checkpoint under that
objective's name for it (``center``, ``patch_center``, ``obj_center``); :class:`Center` is the one
place that reads and updates it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..runtime import is_distributed

METHODS = ("ema", "sinkhorn_knopp")


class Center:
    """One objective's teacher centering (see the module docstring).

    Args:
        method: ``"ema"`` (DINO, iBOT, ODIS) or ``"sinkhorn_knopp"`` (DINOv2, 3 iterations).
        momentum: m of the EMA (0.9 in DINO and iBOT).
        rows_differ_across_ranks: Sinkhorn-Knopp only: ranks hold different numbers of rows
            (DINOv2's patch term, over the masked patches); see :func:`sinkhorn_knopp`.
    """

    def __init__(self, method: str = "ema", momentum: float = 0.9, *, rows_differ_across_ranks: bool = False) -> None:
        if method not in METHODS:
            raise ValueError(f"centering must be 'ema' or 'sinkhorn_knopp', got {method!r}")
        self.method = method
        self.momentum = momentum
        self.rows_differ_across_ranks = rows_differ_across_ranks

    def targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        """The teacher's target distributions, without gradient.

        Args:
            logits: (N, K) float32 teacher logits.
            center: the owner's center buffer, K values ((1, K) or (1, 1, K)).
            temp: the teacher temperature tau_t of this iteration.
        Returns:
            (N, K) float32, each row a distribution over the K prototypes.
        """
        if self.method == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, rows_differ_across_ranks=self.rows_differ_across_ranks)
        return F.softmax((logits - center.view(1, -1)) / temp, dim=-1).detach()

    @torch.no_grad()
    def update(self, center: torch.Tensor, batch_sum: torch.Tensor, count: int | torch.Tensor) -> None:
        """EMA step of ``center`` in place: c <- m c + (1 - m) S / N, with the sum S of the teacher rows
        and their number N summed over ranks; nothing with Sinkhorn-Knopp, or when no rank has a row.

        Args:
            center: the owner's center buffer ((1, K) or (1, 1, K)).
            batch_sum: K values, this rank's sum of the rows the center averages.
            count: how many rows ``batch_sum`` adds up (an int, or a 0-dim tensor).
        """
        if self.method != "ema":
            return
        sums = batch_sum.detach().float().reshape(-1)
        sums = torch.cat([sums, torch.as_tensor(count, dtype=sums.dtype, device=sums.device).reshape(1)])
        if is_distributed():
            dist.all_reduce(sums)
        total = sums[-1]
        updated = center * self.momentum + sums[:-1].view_as(center) / total * (1 - self.momentum)
        # kept where no rank had a row: decided on the device (a where, not an if that would wait for it)
        center.copy_(torch.where(total > 0, updated, center))


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    temp: float,
    n_iterations: int = 3,
    *,
    rows_differ_across_ranks: bool = False,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets, DINOv2's ``sinkhorn_knopp_teacher``.

    With Q = exp(S / tau)^T (K x N), B the number of samples over all ranks and K prototypes:
    Q /= sum(Q) (all ranks); then ``n_iterations`` times: divide each prototype row by its sum
    over all ranks' samples and by K, divide each sample column by its (local) sum and by B;
    finally multiply by B and return Q^T.

    What the iterations guarantee: after the last column step every sample's distribution sums
    to 1 (up to float32 rounding); the prototype sums only approach the uniform B / K (N / K with
    one process), closer with each iteration; 3 iterations (DINOv2's default) leave a residual
    that depends on how peaked exp(S / tau) is.

    Computed in float32 whatever the input dtype (the result stays float32, as in DINOv2), with no
    gradient. There is no max-subtraction before exp, as in DINOv2: logits / temp above ~88 overflow
    float32 (fine for DINO heads with a normalised last layer, whose logits lie in [-1, 1]).

    Args:
        teacher_logits: (N, K) teacher head outputs of this rank's samples (DINOv2 passes the
            [CLS] outputs of both global crops at once, N = 2 x batch).
        temp: teacher temperature tau_t.
        n_iterations: alternating normalisation rounds (3 in DINOv2).
        rows_differ_across_ranks: False: B = N x world_size (the [CLS] variant, every rank has N
            rows). True: B = the sum of N over ranks, all-reduced (DINOv2's iBOT patch-token
            variant, where ranks hold different numbers of masked patches).
    Returns:
        (N, K) float32 targets, each row a probability distribution over the K prototypes.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (N, K), got shape {tuple(teacher_logits.shape)}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    distributed = is_distributed()
    logits = teacher_logits.float()
    q = torch.exp(logits / temp).t()  # (K, N)
    n_prototypes, n_local = q.shape
    if rows_differ_across_ranks and distributed:
        count = torch.tensor([n_local], dtype=torch.float32, device=q.device)
        dist.all_reduce(count)
        n_samples = count[0]  # kept on the device: nothing waits for it
    else:
        n_samples = n_local * (dist.get_world_size() if distributed else 1)

    total = q.sum()
    if distributed:
        dist.all_reduce(total)
    q /= total
    for _ in range(n_iterations):
        per_prototype = q.sum(dim=1, keepdim=True)  # (K, 1): mass of each prototype, all ranks
        if distributed:
            dist.all_reduce(per_prototype)
        q /= per_prototype
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)  # (1, N): mass of each local sample
        q /= n_samples
    q *= n_samples
    return q.t()
