"""BatchNorm over the global batch of all processes, with plain collectives (works over gloo on CPU).

DINO converts student and teacher with ``nn.SyncBatchNorm.convert_sync_batchnorm`` whenever the
head has BatchNorm (``use_bn_in_head``), so that the batch statistics, and with them the run, do
not depend on how the global batch is split over processes. torch's SyncBatchNorm has CUDA kernels
only; :class:`SyncBatchNorm1d` is its counterpart for any backend that can all-reduce CPU tensors:

- forward: every rank all-reduces ``[sum x, sum x^2, count]`` per channel (formed in float64 from
  torch's fused local mean / variance, so the subtraction ``E[x^2] - E[x]^2`` does not cancel),
  then normalizes with the global mean and biased variance; running statistics take the global
  mean and the unbiased global variance, as ``nn.BatchNorm1d`` does on one process.
- backward: the gradient of a global-batch normalization wrt the local rows needs the global sums
  of ``dy`` and ``dy * x_hat``; they are all-reduced as one tensor. Weight and bias gradients stay
  local sums (DDP averages them with the other parameters, as for any layer).

With one process, or in eval mode, it *is* ``nn.BatchNorm1d`` (same code path, same state-dict
keys), so checkpoints do not depend on the conversion.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..runtime import is_distributed


def _world(group: dist.ProcessGroup | None) -> int:
    if not is_distributed():
        return 1
    return dist.get_world_size(group)


def _opmath(x: torch.Tensor) -> torch.Tensor:
    """x in float32 (float64 stays): bf16 / fp16 activations are reduced and differentiated in fp32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.no_grad()
def global_moments(x: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance of the rows of every rank's ``x``.

    Args:
        x: (M, C) this rank's rows (M may differ between ranks, and may be 0).
    Returns:
        mean (C,) and var (C,) in float64, and the global row count N.
    """
    m, c = x.shape
    local = torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
    if m > 0:
        # torch's fused (Welford) CPU kernel; ~20x torch.var_mean(dim=0) on a (384, 2048) batch
        mean, var = torch.batch_norm_update_stats(_opmath(x), None, None, 0.0)
        mean, var = mean.double(), var.double()
        local[:c] = mean * m
        local[c : 2 * c] = (var + mean * mean) * m
        local[-1] = m
    dist.all_reduce(local, group=group)
    n = int(local[-1].item())
    if n == 0:
        raise ValueError("SyncBatchNorm1d got an empty batch on every process")
    mean = local[:c] / n
    var = (local[c : 2 * c] / n - mean * mean).clamp_min(0.0)
    return mean, var, n


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the global batch's mean and var (given).

    Both passes run torch's fused eval-mode kernels (statistics as constants) and add what the
    statistics' dependence on the inputs contributes to the input gradient:
    ``dx = w * invstd * (dy - mean_N(dy) - x_hat * mean_N(dy * x_hat))`` over the global N rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,  # type: ignore[override]
                mean: torch.Tensor, var: torch.Tensor, eps: float, count: int,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        """x (M, C) any float dtype; mean, var (C,) float32; returns (M, C) in x's dtype."""
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.count, ctx.group = eps, count, group
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        xf, dy = _opmath(x), _opmath(grad_y)
        # eval-mode backward: dy * w * invstd, sum(dy * x_hat), sum(dy) (local rows)
        dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, xf, weight, mean, var, None, None, False, ctx.eps, [ctx.needs_input_grad[0], True, True]
        )
        grad_w = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(weight.dtype if weight is not None else dy.dtype) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])  # (2C,), all-reduced to the global sums
            dist.all_reduce(sums, group=ctx.group)
            c = mean.shape[0]
            mean_dy, mean_dy_xhat = sums[:c] / ctx.count, sums[c:] / ctx.count
            invstd = torch.rsqrt(var + ctx.eps)
            a = invstd if weight is None else weight * invstd  # (C,)
            k = a * invstd * mean_dy_xhat  # dx = dy * a - (x - mean) * k - a * mean_dy
            dx = dx.addcmul_(xf, k, value=-1.0).add_(mean * k - a * mean_dy).to(x.dtype)
        return dx, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training-mode statistics span every process of ``process_group``.

    Input (N, C) or (N, C, L), as BatchNorm1d. Identical to ``nn.BatchNorm1d`` with one process
    or in eval mode. All ranks must call it the same number of times, in the same order (it runs a
    collective in forward, and one in backward when the input needs a gradient).
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world(self.process_group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        rows = x if x.dim() == 2 else x.transpose(1, 2).reshape(-1, c)  # (M, C)
        mean, var, n = global_moments(rows.detach(), self.process_group)
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = var * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = _GlobalBatchNorm.apply(rows, self.weight, self.bias, mean.to(dtype), var.to(dtype), self.eps, n,
                                   self.process_group)
        return y if x.dim() == 2 else y.reshape(x.shape[0], x.shape[2], c).transpose(1, 2)

    @classmethod
    def convert(cls, module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
        """Replace every ``nn.BatchNorm1d`` in ``module`` (in place where nested) by this class,
        sharing its parameters and buffers; returns the (possibly new) root module."""
        out = module
        if isinstance(module, nn.BatchNorm1d) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group=process_group)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child, process_group))
        return out
