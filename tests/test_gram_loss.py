"""Gram anchoring's term (objectives/gram.py): hand-computed examples and DINOv3's formula on the same tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_distill.objectives import GramLoss, StepState
from ssl_distill.objectives.gram import mean_patch_similarity, resize_patch_grid

VARIANTS = [dict(remove_neg=False, remove_only_teacher_neg=False), dict(remove_neg=True, remove_only_teacher_neg=False),
            dict(remove_neg=False, remove_only_teacher_neg=True)]


def official_gram_loss(student: torch.Tensor, teacher: torch.Tensor, img_level: bool, remove_neg: bool,
                       remove_only_teacher_neg: bool) -> torch.Tensor:
    """DINOv3's GramLoss.forward (dinov3/loss/gram_loss.py, apply_norm=True), written out: normalise,
    flatten (N, P, D) over the batch unless per image ((M, D) rows stay as they are), X X^T, the
    negative-entry options (as index assignments), torch's MSELoss."""
    t = F.normalize(teacher.float(), dim=-1)
    if not img_level and t.dim() == 3:
        t = t.flatten(0, 1)
    target_sim = torch.matmul(t, t.transpose(-1, -2))
    s = F.normalize(student.float(), dim=-1)
    if not img_level and s.dim() == 3:
        s = s.flatten(0, 1)
    student_sim = torch.matmul(s, s.transpose(-1, -2))
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    elif remove_only_teacher_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


def official_resize(teacher: torch.Tensor, student_side: int) -> torch.Tensor:
    """ssl_meta_arch.get_gram_teacher_output's downsampling: (N, P_t, D) -> (N, D, n, n), bicubic
    without antialias to the student's side, back to (N, side^2, D)."""
    n = int(teacher.shape[1] ** 0.5)
    hw = teacher.transpose(-2, -1).unflatten(-1, (n, n))
    hw = F.interpolate(hw, size=(student_side, student_side), mode="bicubic", align_corners=False, antialias=False)
    return hw.flatten(-2, -1).transpose(-2, -1)


def _state(weight: float = 1.0) -> StepState:
    return StepState(step=0, epoch=0.0, teacher_temp=0.04, patch_teacher_temp=0.04, gram_weight=weight)


def test_hand_computed_examples():
    eye = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # two orthogonal patches (norms do not matter): Gram = I
    same = torch.tensor([[[3.0, 0.0], [1.0, 0.0]]])  # two parallel patches: Gram = all ones
    # per image, 4 entries, the two off-diagonal ones differ by 1: the mean, not the sum, is 2 / 4
    assert GramLoss()(eye, same).item() == 0.5
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # Gram [[1, -1], [-1, 1]]
    assert GramLoss()(opposite, eye).item() == 0.5  # (-1 - 0)^2 twice over 4 entries
    assert GramLoss(remove_neg=True)(opposite, eye).item() == 0.0  # the student's -1s clamped to 0
    assert GramLoss(remove_only_teacher_neg=True)(opposite, eye).item() == 0.5  # the student's are kept
    # both negative: officially the student's entries where both are negative are zeroed, but tested on the
    # teacher matrix already clamped, so nothing is: only the teacher's -1s go (to 0), the loss is 2 / 4
    assert GramLoss()(opposite, opposite).item() == 0.0
    assert GramLoss(remove_only_teacher_neg=True)(opposite, opposite).item() == 0.5
    assert GramLoss(remove_neg=True)(opposite, opposite).item() == 0.0
    # over the batch: two images of one patch each; per image every Gram matrix is [[1]]
    a, b = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]])
    assert GramLoss(img_level=True)(a, b).item() == 0.0
    assert GramLoss(img_level=False)(a, b).item() == 0.5  # I against all ones, 2 x 2 entries


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "remove_neg", "remove_only_teacher_neg"])
def test_equals_the_official_formula_and_gradient(img_level, variant):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 16, 8, generator=g, requires_grad=True)
    teacher = torch.randn(6, 16, 12, generator=g)  # the Gram teacher's width may differ: P x P either way
    ours = GramLoss(img_level=img_level, **variant)(student, teacher)
    (grad,) = torch.autograd.grad(ours, student)
    reference = official_gram_loss(student, teacher, img_level, **variant)
    (grad_ref,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-9)
    assert ours.item() > 0


@pytest.mark.parametrize("img_level", [True, False])
def test_bicubic_resize_of_a_finer_teacher_grid_equals_the_official_path(img_level):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 16, 8, generator=g)  # 4 x 4 patches (global crops)
    teacher = torch.randn(4, 64, 8, generator=g)  # 8 x 8 patches (Gram crops at 2x)
    resized = resize_patch_grid(teacher, 4)
    assert torch.equal(resized, official_resize(teacher, 4))
    out = GramLoss(img_level=img_level).terms({"patch_global": student}, {"gram_patch": teacher}, None, _state(2.0))
    reference = official_gram_loss(student, official_resize(teacher, 4), img_level, False, False)
    torch.testing.assert_close(out["gram"], reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss"], 2.0 * reference, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_patch_grid(torch.zeros(1, 12, 4), 2)


def test_terms_read_the_live_teacher_and_skip_the_teacher_at_weight_0():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 9, 4, generator=g), torch.randn(2, 9, 4, generator=g)
    live = GramLoss(target="patch_global")
    assert live.reads.student == ("patch_global",) and live.reads.teacher == ("patch_global",)
    out = live.terms({"patch_global": student}, {"patch_global": teacher}, None, _state())
    assert torch.equal(out["gram"], live(student, teacher))
    assert set(out) == {"loss", "gram", "gram_student_patch_sim", "gram_teacher_patch_sim"}
    # weight 0 (before the start step): the teacher is not read (not even built), only the student's monitor
    idle = GramLoss().terms({"patch_global": student}, {}, None, _state(0.0))
    assert set(idle) == {"loss", "gram_student_patch_sim"} and idle["loss"].item() == 0.0


def test_mean_patch_similarity_is_the_mean_off_diagonal_cosine():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 10, 6, generator=g)
    gram = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)
    off = gram.masked_select(~torch.eye(10, dtype=torch.bool)).mean()
    torch.testing.assert_close(mean_patch_similarity(x), off, rtol=1e-5, atol=1e-6)
    assert mean_patch_similarity(torch.ones(2, 5, 3)).item() == pytest.approx(1.0)  # every patch the same


def test_compute_stats_are_the_batch_level_loss_on_masked_and_unmasked_patches():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(4, 9, 5, generator=g), torch.randn(4, 9, 5, generator=g)
    masks = torch.rand(4, 9, generator=g) < 0.4
    out = GramLoss(compute_stats=True).terms({"patch_global": student}, {"gram_patch": teacher}, masks, _state())
    for key, where in (("gram_masked", masks), ("gram_unmasked", ~masks)):
        reference = official_gram_loss(student[where], teacher[where], False, False, False)
        torch.testing.assert_close(out[key], reference, rtol=1e-6, atol=0)
    assert "gram_masked" not in GramLoss(compute_stats=True).terms(
        {"patch_global": student}, {"gram_patch": teacher}, None, _state())


def test_refuses_both_negative_variants():
    with pytest.raises(ValueError, match="exclude each other"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
