"""Sinkhorn-Knopp teacher centering (DINOv2): a hand-computed 2 x 2 case, equality with a literal
re-implementation of DINOv2's sinkhorn_knopp_teacher, the marginals the iterations give, the dtype
handling, and 2 gloo processes holding half the rows each against 1 process holding all of them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from ssl_distill.objectives.center import sinkhorn_knopp

from gloo import spawn_gloo


def official_sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2's DINOLoss.sinkhorn_knopp_teacher, rewritten literally."""
    with torch.no_grad():
        teacher_output = teacher_output.float()
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        Q = torch.exp(teacher_output / teacher_temp).t()
        B = Q.shape[1] * world_size
        K = Q.shape[0]
        sum_Q = torch.sum(Q)
        if dist.is_initialized():
            dist.all_reduce(sum_Q)
        Q /= sum_Q
        for _ in range(n_iterations):
            sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
            if dist.is_initialized():
                dist.all_reduce(sum_of_rows)
            Q /= sum_of_rows
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()


def logits(n: int = 64, k: int = 32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, k, generator=g)


def test_hand_computed_two_by_two():
    # exp(S / 1) = [[3, 1], [1, 1]] (rows = samples). Q = exp(S)^T / 6 = [[1/2, 1/6], [1/6, 1/6]].
    # Prototype rows / their sums / K: [[3/8, 1/8], [1/4, 1/4]]. Sample columns / their sums / B:
    # [[3/10, 1/6], [1/5, 1/3]]; times B = 2 and transposed: [[3/5, 2/5], [1/3, 2/3]].
    s = torch.log(torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
    out = sinkhorn_knopp(s, temp=1.0, n_iterations=1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[3 / 5, 2 / 5], [1 / 3, 2 / 3]]), atol=1e-6)
    # prototype marginals 14/15 and 16/15 against the uniform N / K = 1: only approximate
    assert torch.allclose(out.sum(0), torch.tensor([14 / 15, 16 / 15]), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n_iterations", [1, 3, 7])
def test_equals_the_official_code(dtype, n_iterations):
    s = logits(48, 20, seed=1).to(dtype)
    got = sinkhorn_knopp(s, temp=0.07, n_iterations=n_iterations)
    expected = official_sinkhorn_knopp_teacher(s, 0.07, n_iterations)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)


@pytest.mark.parametrize("scale, err_after_3", [(0.1, 0.01), (0.5, 0.6)])
def test_marginals_after_the_iterations(scale, err_after_3):
    """Rows (samples) sum to 1 after every run; prototype mass approaches N / K with each iteration,
    but 3 iterations leave a residual that grows with how peaked exp(S / tau) is: ~0.2% of N / K
    for logits / tau of std 1, ~50% for std 5 (the softmax alone is off by 30% and 120%)."""
    n, k, temp = 64, 32, 0.1
    s = logits(n, k, seed=2, scale=scale)
    prev_err = math.inf
    for iters in (1, 2, 3, 5, 10, 100, 300):
        out = sinkhorn_knopp(s, temp, n_iterations=iters)
        # the final step normalises each sample: rows sum to 1 exactly up to float32 rounding
        assert torch.allclose(out.sum(1), torch.ones(n), atol=1e-6)
        assert (out >= 0).all()
        err = (out.sum(0) - n / k).abs().max().item() / (n / k)
        assert err <= prev_err
        prev_err = err
        if iters == 3:
            assert err < err_after_3
            softmax_err = (torch.softmax(s / temp, dim=1).sum(0) - n / k).abs().max().item() / (n / k)
            assert softmax_err > 2 * err
    assert prev_err < 1e-4


def test_no_gradient_and_input_untouched():
    s = logits(8, 4, seed=3).requires_grad_()
    before = s.detach().clone()
    out = sinkhorn_knopp(s, 0.1)
    assert not out.requires_grad
    assert torch.equal(s.detach(), before)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.1, n_iterations=0)


# ---------------------------------------------------------------------- 2 gloo processes
def _check_split(rank: int, world: int, s: torch.Tensor, cases: list[tuple[list[int], bool, torch.Tensor]]) -> None:
    for sizes, uneven, reference in cases:
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        got = sinkhorn_knopp(s[lo:hi], 0.05, n_iterations=3, rows_differ_across_ranks=uneven)
        assert torch.allclose(got, reference[lo:hi], rtol=1e-5, atol=1e-7), (sizes, uneven)
        if not uneven:  # the even split also matches DINOv2's code running on the same ranks
            assert torch.equal(got, official_sinkhorn_knopp_teacher(s[lo:hi], 0.05, 3))


def test_two_gloo_processes_match_one_process_on_all_rows():
    s = logits(40, 24, seed=4)
    reference = sinkhorn_knopp(s, 0.05, n_iterations=3)
    cases = [
        ([20, 20], False, reference),  # the [CLS] variant: B = N x world_size
        ([27, 13], True, reference),  # the patch-token variant: B = all-reduced row count
    ]
    spawn_gloo(_check_split, s, cases)
