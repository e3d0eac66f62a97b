"""Projection heads."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _RowWeightNorm(torch.autograd.Function):
    """W = g * v / ||v|| per row, with a hand-written backward.

    Autograd's generic path for this expression (norm, broadcast product, quotient) costs ~8 passes
    over the (K, C) matrix; the closed form below needs ~3. For K = 65536 prototypes that is a
    sizeable share of a CPU training step.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        inv = torch.rsqrt((v * v).sum(dim=1, keepdim=True))  # (K, 1)
        w_hat = v * inv
        ctx.save_for_backward(w_hat, inv, g)
        return w_hat * g

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        w_hat, inv, g = ctx.saved_tensors
        dot = (grad_w * w_hat).sum(dim=1, keepdim=True)  # (K, 1) = <dL/dW, w_hat>
        grad_v = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_v = (grad_w - w_hat * dot) * (g * inv)  # projection removes the radial part
        if ctx.needs_input_grad[1]:
            grad_g = dot
        return grad_v, grad_g


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``W = g * V / ||V||`` per output row.

    Parameters keep the names of ``torch.nn.utils.weight_norm`` (``weight_g`` (K, 1), ``weight_v``
    (K, C)) so official DINO / iBOT head checkpoints load unchanged.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        # nn.Linear's default init, as DINO's weight_norm(nn.Linear(...)) last layer.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=1, keepdim=True))

    @property
    def weight(self) -> torch.Tensor:
        return _RowWeightNorm.apply(self.weight_v, self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, K), computed in float32 even under autocast.

        The logits are cosines in [-1, 1] that the loss divides by temperatures down to 0.02-0.04;
        bf16's 8-bit mantissa would quantise them by ~0.1 after that scaling.
        """
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight
            return F.linear(x.to(w.dtype), w)


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, Sec. 3.1 and Appendix).

    ``nlayers``-layer MLP (GELU, hidden 2048) to a 256-d bottleneck, L2 normalisation, then a
    weight-normalised linear layer to ``out_dim`` prototypes. With ``norm_last_layer`` the weight
    norm ``g`` is fixed to 1 (the paper's stabilising choice); otherwise it is learned.
    Input (N, in_dim) -> output (N, out_dim) logits.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, bottleneck_dim): the MLP and the L2 normalisation, before the last layer."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(x))
