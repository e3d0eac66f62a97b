"""The ODIS [OBJ] term against a double loop written from the paper's definition, and DINO's loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_distill.objectives import DINOLoss, StepState
from ssl_distill.objectives.odis import ObjectLoss


def reference(student, teacher, valid, center, t_temp, s_temp, g, v):
    """Explicit loop: every (teacher view i, student view j != i, image b), weight valid[b,i]*valid[b,j]."""
    b = valid.shape[0]
    s = student.view(v, b, -1)
    t = teacher.view(g, b, -1)
    total, n = 0.0, 0
    for i in range(g):
        for j in range(v):
            if j == i:
                continue
            acc = 0.0
            for k in range(b):
                if valid[k, i] and valid[k, j]:
                    q = F.softmax((t[i, k] - center[0]) / t_temp, dim=-1)
                    acc = acc - (q * F.log_softmax(s[j, k] / s_temp, dim=-1)).sum()
            total = total + acc / b
            n += 1
    return total / n


def test_object_term_equals_the_pairwise_definition():
    torch.manual_seed(0)
    g, v, b, k = 2, 5, 4, 9
    student, teacher = torch.randn(v * b, k), torch.randn(g * b, k)
    valid = torch.tensor([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = ObjectLoss(k, v, g, center_momentum=0.5)
    loss.obj_center.copy_(torch.randn(1, k) * 0.1)
    c0 = loss.obj_center.clone()
    out = loss(student, teacher, valid, teacher_temp=0.05)
    torch.testing.assert_close(out["obj"], reference(student, teacher, valid, c0, 0.05, 0.1, g, v))
    # counted (image, pair) terms: image 0: views 0,1 valid, 3 others valid each -> 3 + 3 = 6; image 1: view 0 valid,
    # view 1 invalid -> 3; image 2: 0; image 3: 4 + 4 = 8; over n_pairs * B = 8 * 4
    assert out["obj_valid_pairs"].item() == (6 + 3 + 0 + 8) / 32
    # the center moves toward the mean of the valid teacher rows only: (view 0: images 0, 1, 3; view 1: 0, 3)
    rows = teacher.view(g, b, k)
    valid_rows = torch.stack([rows[0, 0], rows[0, 1], rows[0, 3], rows[1, 0], rows[1, 3]])
    torch.testing.assert_close(loss.obj_center, c0 * 0.5 + valid_rows.mean(0, keepdim=True) * 0.5)


def test_invalid_pairs_add_nothing_and_get_no_gradient():
    torch.manual_seed(1)
    g, v, b, k = 2, 4, 3, 6
    valid = torch.ones(b, v, dtype=torch.bool)
    valid[1, 2] = False  # image 1's first local view does not hold the object
    valid[2] = False  # image 2 has no valid pair at all
    student = torch.randn(v * b, k, requires_grad=True)
    teacher = torch.randn(g * b, k)
    out = ObjectLoss(k, v, g)(student, teacher, valid, teacher_temp=0.04)
    out["obj"].backward()
    grad = student.grad.view(v, b, k)
    assert torch.count_nonzero(grad[2, 1]) == 0 and torch.count_nonzero(grad[:, 2]) == 0
    assert torch.count_nonzero(grad[0, 0]) > 0
    noisy = student.detach().clone().view(v, b, k)
    noisy[2, 1] += 100 * torch.randn(k)
    noisy[:, 2] += 100 * torch.randn(v, k)
    again = ObjectLoss(k, v, g)(noisy.view(v * b, k), teacher, valid, teacher_temp=0.04)
    torch.testing.assert_close(again["obj"], out["obj"].detach())
    nothing = ObjectLoss(k, v, g)(student, teacher, torch.zeros(b, v, dtype=torch.bool), teacher_temp=0.04)
    assert nothing["obj"].item() == 0.0 and nothing["obj_valid_pairs"].item() == 0.0
    assert "obj_teacher_entropy" not in nothing and "obj_teacher_kl_uniform" not in nothing  # not measured


def test_all_valid_is_dinos_loss_on_the_obj_outputs():
    torch.manual_seed(2)
    g, v, b, k = 2, 6, 5, 16
    student, teacher = torch.randn(v * b, k), torch.randn(g * b, k)
    dino, obj = DINOLoss(k, v, g), ObjectLoss(k, v, g)
    center = torch.randn(1, k) * 0.2
    dino.center.copy_(center)
    obj.obj_center.copy_(center)
    state = StepState(step=0, epoch=0.0, teacher_temp=0.06, patch_teacher_temp=0.06)
    ours = obj.terms({"obj": student}, {"obj": teacher, "obj_valid": torch.ones(b, v, dtype=torch.bool)}, None, state)
    theirs = dino.terms({"cls": student}, {"cls": teacher}, None, state)
    torch.testing.assert_close(ours["obj"], theirs["dino"])
    torch.testing.assert_close(obj.obj_center, dino.center)
    torch.testing.assert_close(ours["obj_teacher_entropy"], theirs["teacher_entropy"])


def _obj_center_split(rank: int, world: int, teacher: torch.Tensor, valid: torch.Tensor, expected: torch.Tensor) -> None:
    g, v = 2, valid.shape[1]
    b = valid.shape[0] // world
    mine_valid = valid[rank * b:(rank + 1) * b]
    rows = teacher.view(g, -1, teacher.shape[-1])[:, rank * b:(rank + 1) * b].reshape(g * b, -1)
    loss = ObjectLoss(teacher.shape[-1], v, g, center_momentum=0.5)
    loss(torch.zeros(v * b, teacher.shape[-1]), rows, mine_valid, teacher_temp=0.05)
    torch.testing.assert_close(loss.obj_center, expected)


def test_obj_center_counts_the_valid_rows_of_every_rank():
    """2 gloo processes holding half the images each (rank 1 with fewer valid views) update the [OBJ]
    center as 1 process holding all of them: sums and counts are all-reduced, not per-rank means."""
    from gloo import spawn_gloo

    torch.manual_seed(5)
    g, v, b, k = 2, 3, 4, 7
    teacher = torch.randn(g * b, k)
    valid = torch.ones(b, v, dtype=torch.bool)
    valid[2:, 0] = False
    valid[3] = False
    loss = ObjectLoss(k, v, g, center_momentum=0.5)
    loss(torch.zeros(v * b, k), teacher, valid, teacher_temp=0.05)
    spawn_gloo(_obj_center_split, teacher, valid, loss.obj_center.clone())
