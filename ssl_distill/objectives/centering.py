"""Teacher centering by Sinkhorn-Knopp, as DINOv2 uses it in place of DINO's EMA center.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024, Sec. 4
("Sinkhorn-Knopp centering", after SwAV: Caron et al., NeurIPS 2020, Sec. 3.1 and Eq. (3)):
the teacher targets are Q* = Diag(u) exp(S^T / tau) Diag(v), the assignment whose prototype
marginals are uniform (1/K each) and whose sample marginals are uniform (1/B each), approximated
by a few alternating normalisations and rescaled so that each sample's distribution sums to one.

The EMA center of DINO (Eq. 4 of Caron et al., ICCV 2021) lives in :mod:`ssl_distill.objectives.dino`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    distributed = _dist_on()
    logits = teacher_logits.float()
    q = torch.exp(logits / temp).t()  # (K, N)
    n_prototypes, n_local = q.shape
    if rows_differ_across_ranks and distributed:
        count = torch.tensor([n_local], dtype=torch.long, device=q.device)
        dist.all_reduce(count)
        n_samples = int(count.item())
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
