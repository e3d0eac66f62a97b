"""KoLeo regulariser: spreads a batch's features uniformly on the sphere.

Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019, Sec. 3 (the KoLeo regulariser L_koleo):
the Kozachenko-Leonenko differential entropy estimator gives L_koleo = -1/n sum_i log(rho_n,i),
rho_n,i = min_{j != i} ||f(x_i) - f(x_j)|| on L2-normalised features. DINOv2 (Oquab et al.,
TMLR 2024, Sec. 4) adds it, weight 0.1, on the student's backbone [CLS] outputs (after the
final LayerNorm, before the DINO head) of the global crops, one term per crop, summed.

Details as in DINOv2's ``KoLeoLoss``:

* features are normalised with ``F.normalize(x, p=2, eps=eps)``;
* the nearest neighbour is the largest inner product with the diagonal set to -1 (so a point is
  its own neighbour only when all others are at inner product -1 or below, e.g. B = 2 antipodal);
* the distance is ``F.pairwise_distance(x_i, x_nn(i), eps=1e-8)``, i.e. ``||x_i - x_nn(i) + 1e-8||``
  (torch adds eps to each component of the difference), which keeps the gradient finite when two
  rows coincide; the loss is ``-mean(log(d + eps))``;
* autocast is off and the input dtype is kept (DINOv2 does not upcast either).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reads, StepState

PAIRWISE_EPS = 1e-8


@torch.no_grad()
def nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by maximum inner product.

    Args:
        x: (B, D) L2-normalised rows.
    Returns:
        (B,) long; the diagonal of x x^T is replaced by -1 before the arg-max.
    """
    dots = x @ x.t()
    dots.fill_diagonal_(-1.0)
    return dots.max(dim=1).indices


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of one set of features (Sablayrolles et al., ICLR 2019, L_koleo).

    Args:
        x: (B, D) features, B >= 2 (one crop's student [CLS] backbone outputs in DINOv2).
        eps: normalisation eps and the eps inside the log (1e-8 in DINOv2).
    Returns:
        scalar -1/B sum_i log(||x_i - x_nn(i) + 1e-8|| + eps) on L2-normalised rows.
    """
    if x.dim() != 2:
        raise ValueError(f"features must be (B, D), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError("KoLeo needs at least 2 rows: with one, the nearest neighbour is the row itself")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        nn_index = nearest_neighbours(x)
        distances = F.pairwise_distance(x, x[nn_index], p=2, eps=PAIRWISE_EPS)  # (B,)
        return -torch.log(distances + eps).mean()


def koleo_loss_per_crop(cls_tokens: torch.Tensor, n_crops: int = 2, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's use: the sum over crops of :func:`koleo_loss` on each crop's chunk.

    Neighbours are searched within a crop only, so the other crop of the same image is never a
    candidate. DINOv2 multiplies this sum by ``koleo_loss_weight`` (0.1) and logs it divided by 2.

    Args:
        cls_tokens: (n_crops * B, D) student backbone [CLS] outputs, crop-major.
        n_crops: number of (global) crops stacked in ``cls_tokens``.
        eps: as :func:`koleo_loss`.
    Returns:
        scalar sum_c koleo_loss(chunk_c).
    """
    if cls_tokens.shape[0] % n_crops != 0:
        raise ValueError(f"{cls_tokens.shape[0]} rows do not split into {n_crops} equal crops")
    return sum(koleo_loss(chunk, eps) for chunk in cls_tokens.chunk(n_crops))  # type: ignore[return-value]


class KoLeoLoss(nn.Module):
    """Module form of :func:`koleo_loss_per_crop` (``n_crops=1`` gives plain :func:`koleo_loss`).

    Args:
        n_crops: crops stacked crop-major in the input (2 global crops in DINOv2).
        eps: as :func:`koleo_loss`.
        weight: the term's weight in the total loss (``dino.koleo_weight``, 0.1 in DINOv2).
        n_views: V, the views whose rows the step's ``student["cls_feat"]`` holds, the ``n_crops``
            global ones first (None: the global ones only).
    """

    loss_terms = ("koleo",)
    reads = Reads(student=("cls_feat",))
    collapse_keys = ()

    def __init__(self, n_crops: int = 2, eps: float = 1e-8, weight: float = 1.0, n_views: int | None = None) -> None:
        super().__init__()
        self.n_crops = n_crops
        self.eps = eps
        self.weight = weight
        self.n_views = n_views or n_crops

    def terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              masks: torch.Tensor | None, state: StepState) -> dict[str, torch.Tensor]:
        """The step's interface: the student's backbone CLS features of the ``n_crops`` global views
        (the first ``n_crops * B`` of the ``n_views * B`` rows of ``student["cls_feat"]``)."""
        features = student["cls_feat"]
        koleo = self(features[: features.shape[0] // self.n_views * self.n_crops].float())
        return {"loss": koleo * self.weight, "koleo": koleo}

    def forward(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        """(n_crops * B, D) -> scalar."""
        return koleo_loss_per_crop(cls_tokens, self.n_crops, self.eps)

