"""DINO loss against the paper's formula (Caron et al. 2021, Eq. 1-4) on identical tensors."""
import math

import torch
import torch.nn.functional as F

from ssl_distill.objectives import DINOLoss, teacher_statistics


def reference_dino_loss(student, teacher, center, n_crops, n_global, tau_s, tau_t, m):
    """Straight double loop over (teacher view, student view) pairs, as main_dino.py's DINOLoss."""
    s = (student / tau_s).chunk(n_crops)
    t = F.softmax((teacher - center) / tau_t, dim=-1).chunk(n_global)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    new_center = center * m + teacher.sum(0, keepdim=True) / len(teacher) * (1 - m)
    return total / n, new_center


def test_matches_reference_and_updates_center_after_loss():
    torch.manual_seed(0)
    K, B, V, G = 64, 5, 6, 2
    loss_fn = DINOLoss(K, V, G, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, K) * 0.1)
    center0 = loss_fn.center.clone()
    student, teacher = torch.randn(V * B, K), torch.randn(G * B, K)
    out = loss_fn(student, teacher, teacher_temp=0.04)
    ref, ref_center = reference_dino_loss(student, teacher, center0, V, G, 0.1, 0.04, 0.9)
    torch.testing.assert_close(out["dino"], ref, rtol=1e-6, atol=1e-6)
    # the loss used the old center; the buffer now holds the EMA update
    torch.testing.assert_close(loss_fn.center, ref_center)


def test_hand_computed_two_views():
    # K=2, one image, 2 global views and no local views: loss = mean of H(q1, p2) and H(q2, p1).
    loss_fn = DINOLoss(2, n_crops=2, n_global=2, student_temp=1.0, center_momentum=0.0)
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p1 = (.5, .5), p2 = (.75, .25)
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # q1 = (.75, .25), q2 = (.5, .5)
    out = loss_fn(student, teacher, teacher_temp=1.0)
    h_q1_p2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h_q2_p1 = -(0.5 * math.log(0.5) + 0.5 * math.log(0.5))
    assert abs(out["dino"].item() - (h_q1_p2 + h_q2_p1) / 2) < 1e-6
    # center momentum 0: center becomes the batch mean of the teacher logits
    torch.testing.assert_close(loss_fn.center, teacher.mean(0, keepdim=True))


def test_gradient_matches_reference():
    torch.manual_seed(1)
    K, B, V, G = 32, 3, 4, 2
    student = torch.randn(V * B, K, requires_grad=True)
    teacher = torch.randn(G * B, K)
    DINOLoss(K, V, G)(student, teacher, 0.07)["dino"].backward()
    g1 = student.grad.clone()
    student.grad = None
    ref, _ = reference_dino_loss(student, teacher, torch.zeros(1, K), V, G, 0.1, 0.07, 0.9)
    ref.backward()
    torch.testing.assert_close(g1, student.grad, rtol=1e-5, atol=1e-7)


def test_teacher_gets_no_gradient():
    K = 8
    teacher = torch.randn(4, K, requires_grad=True)
    DINOLoss(K, 2)(torch.randn(4, K, requires_grad=True), teacher, 0.04)["dino"].backward()
    assert teacher.grad is None


def test_collapse_statistics():
    K = 16
    uniform = torch.full((4, K), 1.0 / K)
    s = teacher_statistics(uniform)
    assert abs(s["teacher_entropy"].item() - math.log(K)) < 1e-5 and abs(s["teacher_kl_uniform"].item()) < 1e-5
    onehot_same = F.one_hot(torch.zeros(4, dtype=torch.long), K).float()
    s = teacher_statistics(onehot_same)
    assert s["teacher_entropy"].item() < 1e-5 and abs(s["teacher_kl_uniform"].item() - math.log(K)) < 1e-5
    onehot_spread = F.one_hot(torch.arange(4), K).float()
    s = teacher_statistics(onehot_spread)
    assert abs(s["teacher_kl_uniform"].item() - (math.log(K) - math.log(4))) < 1e-5
    # no masked patch / no valid [OBJ] view: nothing measured (neither NaN nor a 0 that reads as a sharp teacher)
    assert teacher_statistics(torch.empty(0, K)) == {}


def test_local_crop_weight_1_is_the_term_unchanged_and_0_5_the_written_out_formula():
    """DINOv3's local-crop reweighting (Gram stage): (global pairs + w * local pairs) / number of pairs."""
    torch.manual_seed(2)
    K, B, V, G = 48, 4, 6, 2
    student, teacher = torch.randn(V * B, K), torch.randn(G * B, K)
    plain = DINOLoss(K, V, G)(student, teacher, 0.04)["dino"]
    assert torch.equal(DINOLoss(K, V, G)(student, teacher, 0.04, local_weight=1.0)["dino"], plain)

    got = DINOLoss(K, V, G)(student, teacher, 0.04, local_weight=0.5)["dino"]
    s = (student / 0.1).chunk(V)
    t = F.softmax(teacher / 0.04, dim=-1).chunk(G)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(V):
            if v == iq:
                continue
            weight = 1.0 if v < G else 0.5
            total = total + weight * torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    torch.testing.assert_close(got, total / n, rtol=1e-6, atol=1e-6)
    # DINOv3's form: dino_global_scale * L_global + dino_local_scale * w * L_local, each L the mean over its pairs
    global_pairs, local_pairs = G * (G - 1), G * (V - G)
    l_global = sum(torch.sum(-t[i] * F.log_softmax(s[v], -1), -1).mean() for i in range(G) for v in range(G) if v != i)
    l_local = sum(torch.sum(-t[i] * F.log_softmax(s[v], -1), -1).mean() for i in range(G) for v in range(G, V))
    official = (global_pairs * l_global / global_pairs + local_pairs * 0.5 * l_local / local_pairs) / (
        global_pairs + local_pairs)
    torch.testing.assert_close(got, official, rtol=1e-6, atol=1e-6)
