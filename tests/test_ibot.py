"""Masked-image objectives in the one training step: iBOT's mask token and patch term, AttMask's
masks from the teacher's attention, DINOv2's extras, and end-to-end runs that stop, resume and evaluate."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_distill.checkpoints import load_file
from ssl_distill.config import ConfigError, load_config
from ssl_distill.data.attmask import attmask, draw_batch_ratio
from ssl_distill.engine.masks import StepMasks
from ssl_distill.engine.train import Trainer, train
from ssl_distill.models import BackboneSpec, ViTBackbone
from ssl_distill.objectives import DINOLoss, PatchLoss, StepState

from test_end_to_end import CONFIG, assert_same_teacher_and_center, make_folder, tiny_overrides

IBOT = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0,0.3]", "masking.pred_ratio_var=[0,0.2]"]
ATTMASK = ["ibot.weight=1", "masking.attmask=hint", "masking.pred_ratio=0.3", "masking.pred_ratio_var=0.2"]
DINOV2 = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0,0.3]", "masking.pred_ratio_var=[0,0.2]",
          "ibot.shared_head=false", "ibot.patch_out_dim=48", "dino.centering=sinkhorn_knopp",
          "ibot.centering=sinkhorn_knopp", "dino.koleo_weight=0.1"]


# ---------------------------------------------------------------- the mask token
def test_mask_token_replaces_exactly_the_masked_patch_embeddings():
    torch.manual_seed(0)
    backbone = ViTBackbone(BackboneSpec(arch="vit_tiny", depth=2, patch_size=8, img_size=32), mask_token=True).eval()
    with torch.no_grad():
        backbone.masked_embed.normal_()
    x = torch.randn(3, 3, 32, 32)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    mask[2, 15] = True
    seen = []
    hook = backbone.vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    backbone.forward_tokens(x)
    backbone.forward_tokens(x, mask=mask)
    hook.remove()
    plain, masked = seen  # (3, 1 + 16, D): CLS then patches, after the position embedding
    changed = (plain != masked).any(-1)
    assert torch.equal(changed[:, 1:], mask) and not changed[:, 0].any()
    # a masked position holds the mask token plus that position's embedding, as iBOT's prepare_tokens
    pos = backbone.vit.pos_embed[0, 1:]
    torch.testing.assert_close(masked[0, 1 + 5], backbone.masked_embed[0] + pos[5])
    with pytest.raises(ValueError, match="mask_token=True"):
        ViTBackbone(BackboneSpec(arch="vit_tiny", depth=1, patch_size=8, img_size=32)).forward_tokens(x, mask=mask)


def test_cls_attention_is_the_last_blocks_cls_row_averaged_over_heads():
    torch.manual_seed(1)
    backbone = ViTBackbone(BackboneSpec(arch="vit_tiny", depth=2, patch_size=8, img_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    inputs = []
    hook = backbone.vit.blocks[-1].attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    out = backbone.forward_tokens(x, cls_attention=True)
    hook.remove()
    attn = backbone.vit.blocks[-1].attn
    b, t, _ = inputs[0].shape
    q, k, _ = attn.qkv(inputs[0]).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    full = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, heads, T, T)
    torch.testing.assert_close(out["cls_attention"], full[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(out["cls"], backbone.forward_tokens(x)["cls"])  # the same forward's outputs


# ---------------------------------------------------------------- the patch term
def official_ibot_loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, center, center2, temp, temp2,
                       ngcrops, ncrops, student_temp=0.1, lambda1=1.0, lambda2=1.0):
    """main_ibot.py's iBOTLoss.forward and update_center, written out literally (one process)."""
    s_cls = (student_cls / student_temp).chunk(ncrops)
    s_patch = (student_patch / student_temp).chunk(ngcrops)
    t_cls = F.softmax((teacher_cls - center) / temp, dim=-1).chunk(ngcrops)
    t_patch = F.softmax((teacher_patch - center2) / temp2, dim=-1).chunk(ngcrops)
    masks = masks.chunk(ngcrops)
    total1 = total2 = 0
    n1 = n2 = 0
    for q in range(len(t_cls)):
        for v in range(len(s_cls)):
            if v == q:
                loss2 = torch.sum(-t_patch[q] * F.log_softmax(s_patch[v], dim=-1), dim=-1)
                mask = masks[v]
                loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                total2 += loss2.mean()
                n2 += 1
            else:
                loss1 = torch.sum(-t_cls[q] * F.log_softmax(s_cls[v], dim=-1), dim=-1)
                total1 += loss1.mean()
                n1 += 1
    new_center = center * 0.9 + teacher_cls.sum(0, keepdim=True) / len(teacher_cls) * 0.1
    new_center2 = center2 * 0.9 + teacher_patch.mean(1).sum(0, keepdim=True) / len(teacher_patch) * 0.1
    return total1 / n1 * lambda1, total2 / n2 * lambda2, new_center, new_center2


def test_patch_and_cls_terms_equal_the_official_ibot_loss_on_identical_tensors():
    torch.manual_seed(2)
    g, v, b, p, k = 2, 4, 3, 6, 11
    masks = torch.rand(g * b, p) < 0.4
    masks[1] = False  # an image without masked patches adds zero to the patch term
    student_cls, teacher_cls = torch.randn(v * b, k), torch.randn(g * b, k)
    student_patch, teacher_patch = torch.randn(g * b, p, k), torch.randn(g * b, p, k)
    dino = DINOLoss(k, v, g, weight=0.7)
    patch = PatchLoss(k, weight=1.3)
    dino.center.copy_(torch.randn(1, k) * 0.1)
    patch.patch_center.copy_(torch.randn(1, 1, k) * 0.1)
    c0, c20 = dino.center.clone(), patch.patch_center.clone()
    state = StepState(step=0, epoch=0.0, teacher_temp=0.05, patch_teacher_temp=0.06)
    student = {"cls": student_cls, "patch_masked": student_patch[masks]}
    teacher = {"cls": teacher_cls, "patch_masked": teacher_patch[masks], "patch_mean": teacher_patch.mean((0, 1))[None]}
    ours_cls = dino.terms(student, teacher, masks, state)["loss"]
    ours_patch = patch.terms(student, teacher, masks, state)["loss"]
    ref_cls, ref_patch, ref_c, ref_c2 = official_ibot_loss(student_cls, student_patch, teacher_cls, teacher_patch,
                                                           masks, c0, c20, 0.05, 0.06, g, v, lambda1=0.7, lambda2=1.3)
    torch.testing.assert_close(ours_cls, ref_cls)
    torch.testing.assert_close(ours_patch, ref_patch)
    torch.testing.assert_close(dino.center, ref_c)
    torch.testing.assert_close(patch.patch_center, ref_c2)
    # what the student predicts at unmasked positions cannot matter: the official loss ignores it too
    noisy = student_patch + 10 * torch.randn_like(student_patch) * (~masks).unsqueeze(-1)
    _, ref_noisy, _, _ = official_ibot_loss(student_cls, noisy, teacher_cls, teacher_patch, masks, c0, c20, 0.05,
                                            0.06, g, v, lambda2=1.3)
    torch.testing.assert_close(ref_noisy, ref_patch)


def test_teacher_patch_targets_equal_the_head_on_every_patch():
    """The teacher runs its head's last layer on the masked rows and on the mean bottleneck only: the
    same logits and center update as iBOT's head applied to every patch, shared or separate head."""
    from ssl_distill.models import DINOHead, MultiCropModel

    torch.manual_seed(3)
    backbone = ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2), mask_token=True)
    for separate in (False, True):
        head = DINOHead(192, 50, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
        patch_head = DINOHead(192, 30, hidden_dim=64, bottleneck_dim=16) if separate else None
        model = MultiCropModel(backbone, head, patch_head).eval()
        x = torch.randn(4, 3, 32, 32)
        masks = torch.rand(4, 16) < 0.3
        with torch.no_grad():
            out = model([x], patches="targets")
            got = model.patch_targets(out["patch_z"], masks)
            tokens = model([x], patch_tokens=True)["patch_global"]
            masked_only = model.masked_patch_targets(tokens, masks)  # Sinkhorn-Knopp's, a head without BatchNorm
            full = (patch_head or head)(backbone.forward_tokens(x)["patch"].reshape(64, 192)).view(4, 16, -1)
        torch.testing.assert_close(got["patch_masked"], full[masks], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["patch_mean"], full.mean((0, 1))[None], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(masked_only["patch_masked"], full[masks], rtol=1e-5, atol=1e-6)
        assert "patch_mean" not in masked_only
        assert torch.equal(masked_only["patch_positions"], got["patch_positions"])


def test_sinkhorn_knopp_patch_term_reads_no_mean_and_ema_needs_it():
    """DINOv2's patch term (Sinkhorn-Knopp) has no center: the step's teacher builds no mean patch logit for
    it (its head then runs on the masked patches only); iBOT's EMA center cannot be updated without one."""
    masks = torch.tensor([[False, True], [True, False]])
    student, teacher = torch.randn(2, 8), torch.randn(2, 8)
    sk = PatchLoss(8, centering="sinkhorn_knopp")
    assert sk.reads.teacher == ("patch_masked",) and PatchLoss(8).reads.teacher == ("patch_masked", "patch_mean")
    out = sk(student, teacher, None, masks, teacher_temp=0.07)
    assert torch.isfinite(out["patch"]) and torch.equal(sk.patch_center, torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="teacher_mean"):
        PatchLoss(8)(student, teacher, None, masks, teacher_temp=0.07)


def test_patch_term_by_hand():
    """Two images, two patches, K = 2, tau_s = tau_t = 1, zero center: image 0 masks patch 1 only,
    image 1 masks nothing and adds zero; the loss is the mean over the two images."""
    loss = PatchLoss(2, student_temp=1.0, center_momentum=0.0)
    masks = torch.tensor([[False, True], [False, False]])
    teacher = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]], [[1.0, 2.0], [3.0, 4.0]]])  # q = (3/4, 1/4) at (0, 1)
    student = torch.tensor([[0.0, math.log(2.0)]])  # p = (1/3, 2/3) at image 0, patch 1
    out = loss(student, teacher[masks], teacher.mean((0, 1))[None], masks, teacher_temp=1.0)
    expected = -(0.75 * math.log(1 / 3) + 0.25 * math.log(2 / 3)) / 1 / 2
    assert out["patch"].item() == pytest.approx(expected, rel=1e-6)
    assert out["mask_ratio"].item() == pytest.approx(0.25)
    # collapse monitors of the one masked patch's target q = (3/4, 1/4): H(q), and KL(q || U) = log 2 - H(q)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert out["patch_teacher_entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert out["patch_teacher_kl_uniform"].item() == pytest.approx(math.log(2) - entropy, rel=1e-5)
    # center momentum 0: the center becomes the mean teacher patch token over patches and images
    torch.testing.assert_close(loss.patch_center[0, 0], teacher.mean(1).mean(0))
    nothing = loss(student[:0], teacher[:0, 0], teacher.mean((0, 1))[None], torch.zeros(2, 2, dtype=torch.bool),
                   teacher_temp=1.0)
    assert nothing["patch"].item() == 0.0
    assert "patch_teacher_entropy" not in nothing and "patch_teacher_kl_uniform" not in nothing  # not measured


# ---------------------------------------------------------------- AttMask in the step
def test_attmask_masks_come_from_the_teachers_attention_and_the_step_key():
    cfg = load_config(CONFIG, ATTMASK)
    masks = StepMasks(cfg)
    attention = torch.rand(6, 16)
    state = StepState(step=7, epoch=1.5, teacher_temp=0.04, patch_teacher_temp=0.07)
    got = masks.build(None, {"cls_attention": attention}, state)[0]
    g = masks.generator(7)
    r = draw_batch_ratio(cfg.masking.pred_ratio, cfg.masking.pred_ratio_var, g)
    r2 = draw_batch_ratio(cfg.masking.pred_ratio, cfg.masking.pred_ratio_var, g)
    assert torch.equal(got, attmask(attention, r, "hint", masking_prob=0.5, generator=g, hint_ratio=r2))
    assert torch.equal(got, masks.build(None, {"cls_attention": attention}, state)[0])  # a resumed run draws the same
    assert not torch.equal(got, masks.build(None, {"cls_attention": attention}, StepState(8, 1.5, 0.04, 0.07))[0])
    late = StepMasks(load_config(CONFIG, ATTMASK + ["masking.pred_start_epoch=2"]))
    assert not late.build(None, {"cls_attention": attention}, state)[0].any()


@pytest.mark.parametrize("overrides, expect", [
    (["masking.attmask=high"], "masking.attmask=high masks patches for a masked-image objective, but ibot.weight=0"),
    (["ibot.weight=1"], "ibot.weight > 0 trains on masked patches, but nothing masks them"),
    (["ibot.weight=1", "masking.attmask=high", "masking.shape=block"], "choose one"),
    (["ibot.weight=1", "masking.attmask=top"], "masking.attmask must be none, high, low or hint"),
    (["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=1.0"], r"pred_ratio\[0\]=1.0 is out of range"),
    (["ibot.centering=sk"], "ibot.centering must be ema"),
])
def test_inconsistent_masked_configs_are_refused_with_the_reason(overrides, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(CONFIG, overrides)


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("masked")
    return make_folder(base / "train", 12, 0), make_folder(base / "val", 4, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("ibot", IBOT), ("attmask", ATTMASK), ("dinov2", DINOV2)])
def test_masked_runs_stop_resume_bit_identically_and_evaluate(name, extra, folders, tmp_path):
    train_dir, val_dir = folders
    overrides = extra + ["optim.epochs=2", "optim.warmup_epochs=0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(CONFIG, tiny_overrides(train_dir, full) + overrides))
    assert train(load_config(CONFIG, tiny_overrides(train_dir, part) + overrides + ["run.stop_at_step=7"]))["step"] == 7
    train(load_config(CONFIG, tiny_overrides(train_dir, part) + overrides))
    a, b = load_file(full / "checkpoint.pth"), load_file(part / "checkpoint.pth")
    assert a["step"] == b["step"] == 12
    assert_same_teacher_and_center(a, b)
    assert set(a["loss"]) == ({"center", "patch_center"})
    assert torch.equal(a["loss"]["patch_center"], b["loss"]["patch_center"])
    assert "backbone.masked_embed" in a["student"]
    assert ("head.last_layer.weight_v" in a["teacher"]) and (("patch_head.mlp.0.weight" in a["teacher"]) == (name == "dinov2"))
    log = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["patch"]) and 0 <= r["mask_ratio"] < 0.5 for r in log)
    assert any(r["mask_ratio"] > 0 for r in log) and ("koleo" in log[-1]) == (name == "dinov2")
    out = subprocess.run(
        [sys.executable, "-m", "ssl_distill.cli", "knn", str(part), "--train", str(train_dir), "--val", str(val_dir),
         "knn.image_size=32", "knn.resize_size=32", "knn.ks=[3]", "knn.num_workers=0"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads((part / "knn.json").read_text())["accuracy"]["k=3"]["top1"] >= 75.0  # chance: 50%


def test_a_dino_checkpoint_from_before_the_masked_objectives_resumes(folders, tmp_path, capsys):
    """Checkpoints written before the config had ``masking`` / ``ibot`` sections (and the DINO
    weight / centering / KoLeo keys) resume, and the config note lists no spurious differences."""
    train_dir, _ = folders
    out = tmp_path / "run"
    train(load_config(CONFIG, tiny_overrides(train_dir, out) + ["run.stop_at_step=2"]))
    ckpt = load_file(out / "checkpoint.pth")
    for section in ("masking", "ibot"):
        del ckpt["config"][section]
    for key in ("weight", "centering", "koleo_weight"):
        del ckpt["config"]["dino"][key]
    torch.save(ckpt, out / "checkpoint.pth")
    capsys.readouterr()
    trainer = Trainer(load_config(CONFIG, tiny_overrides(train_dir, out) + ["run.stop_at_step=3"]))
    said = capsys.readouterr().out
    assert "resumed from" in said and "run.stop_at_step: 2 -> 3" in said
    assert not any(word in said for word in ("masking", "ibot", "dino."))  # only the real change is listed
    assert trainer.fit()["step"] == 3


def test_the_step_builds_patch_outputs_only_for_masked_objectives(folders, tmp_path):
    train_dir, _ = folders
    dino = Trainer(load_config(CONFIG, tiny_overrides(train_dir, tmp_path / "d")))
    assert not dino.patches and [type(o).__name__ for o in dino.objectives] == ["DINOLoss"]
    assert dino.student.backbone.masked_embed is None and dino.student.patch_head is None
    v2 = Trainer(load_config(CONFIG, tiny_overrides(train_dir, tmp_path / "v") + DINOV2))
    assert [type(o).__name__ for o in v2.objectives] == ["DINOLoss", "PatchLoss", "KoLeoLoss"]
    assert v2.objectives[1].patch_center.shape == (1, 1, 48) and v2.student.patch_head is not None
    assert np.isclose(v2.objectives[2].weight, 0.1)


# ---------------------------------------------------------------- recipes
def test_masked_recipes_are_the_official_commands():
    """iBOT README's ViT-S/16 command, AttMask README's ViT-S/16 100-epoch commands, DINOv2's defaults."""
    ibot = load_config("configs/ibot_vit_small16.yaml")
    c, m, d, p, mk, o = ibot.data.crops, ibot.model, ibot.dino, ibot.ibot, ibot.masking, ibot.optim
    assert (c.n_global, c.global_size, c.global_scale, c.n_local, c.local_size, c.local_scale) == (
        2, 224, (0.25, 1.0), 10, 96, (0.05, 0.25))
    assert (m.arch, m.patch_size, m.out_dim, m.norm_last_layer, m.drop_path_rate) == ("vit_small", 16, 8192, False, 0.1)
    assert (d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs, d.weight) == (0.04, 0.07, 30, 1.0)
    assert (p.weight, p.warmup_teacher_temp, p.teacher_temp, p.center_momentum, p.shared_head) == (
        1.0, 0.04, 0.07, 0.9, True)
    assert (mk.shape, mk.pred_ratio, mk.pred_ratio_var, mk.pred_start_epoch) == ("block", (0.0, 0.3), (0.0, 0.2), 0)
    assert (o.epochs, o.lr, o.min_lr, o.warmup_epochs, o.clip_grad, o.freeze_last_layer, o.momentum_teacher) == (
        800, 0.0005, 1e-6, 10, 3.0, 1, 0.996)
    assert ibot.data.batch_size * 16 == 1024
    for path, strategy in (("configs/attmask_vit_small16.yaml", "high"), ("configs/attmask_hint_vit_small16.yaml", "hint")):
        att = load_config(path)
        assert (att.masking.shape, att.masking.attmask, att.masking.pred_ratio, att.masking.pred_ratio_var,
                att.masking.masking_prob) == ("none", strategy, (0.3,), (0.2,), 0.5)
        assert (att.data.batch_size, att.optim.epochs, att.model.out_dim, att.model.norm_last_layer) == (60, 100, 8192, False)
        assert (att.data.crops.global_scale, att.data.crops.local_scale, att.data.crops.n_local) == (
            (0.25, 1.0), (0.05, 0.25), 10)
        assert (att.dino.teacher_temp, att.dino.warmup_teacher_temp_epochs, att.ibot.shared_head) == (0.07, 30, True)
    v2 = load_config("configs/dinov2_style_vit_small14.yaml")
    assert (v2.dino.centering, v2.ibot.centering, v2.dino.koleo_weight, v2.ibot.shared_head) == (
        "sinkhorn_knopp", "sinkhorn_knopp", 0.1, False)
    assert (v2.model.patch_size, v2.model.layer_scale, v2.data.crops.local_size, v2.optim.momentum_teacher) == (
        14, 1e-5, 98, 0.992)
    for path in ("configs/ibot_tiny_fmnist.yaml", "configs/attmask_tiny_fmnist.yaml"):
        tiny, demo = load_config(path), load_config("configs/dino_tiny_fmnist.yaml")
        assert tiny.ibot.weight == 1.0 and tiny.data == demo.data and tiny.model == demo.model and tiny.optim == demo.optim
    # the demo's recipe, DINOv2-style: DINO's tiny recipe with heads 512 wide, batch 64, 1024 prototypes per
    # head and 4 blocks (the budget choices its header documents), lr 0.003, trained 4.3 epochs
    from dataclasses import replace

    dino, v2_tiny = load_config("configs/dino_tiny_fmnist.yaml"), load_config("configs/dinov2_style_tiny_fmnist.yaml")
    assert replace(v2_tiny.data, batch_size=128) == dino.data
    assert replace(v2_tiny.model, hidden_dim=2048, out_dim=4096, depth=6) == dino.model
    assert (v2_tiny.data.batch_size, v2_tiny.model.hidden_dim, v2_tiny.model.out_dim, v2_tiny.model.depth,
            v2_tiny.ibot.patch_out_dim) == (64, 512, 1024, 4, 1024)
    assert replace(v2_tiny.optim, epochs=3, lr=dino.optim.lr) == dino.optim
    assert (v2_tiny.optim.epochs, v2_tiny.optim.lr) == (4.3, 0.003)
    assert v2_tiny.monitor == dino.monitor
    # each its own run directory: the README runs the demo and then DINO's recipe, which would resume the other
    assert (v2_tiny.run.output_dir, dino.run.output_dir) == ("runs/fmnist_demo", "runs/fmnist_dino")
    assert (v2_tiny.dino.centering, v2_tiny.ibot.centering, v2_tiny.dino.koleo_weight, v2_tiny.ibot.shared_head) == (
        "sinkhorn_knopp", "sinkhorn_knopp", 0.1, False)


def _patch_center_split(rank: int, world: int, teacher: torch.Tensor, expected: torch.Tensor) -> None:
    loss = PatchLoss(teacher.shape[-1], center_momentum=0.5)
    half = teacher.shape[0] // world
    mine = teacher[rank * half:(rank + 1) * half]
    masks = torch.zeros(mine.shape[:2], dtype=torch.bool)
    masks[:, 0] = True
    loss(mine[masks] * 0, mine[masks], mine.mean((0, 1))[None], masks, teacher_temp=0.07)
    torch.testing.assert_close(loss.patch_center, expected)


def test_patch_center_is_averaged_over_ranks():
    """2 gloo processes holding half the images each update the patch center as 1 process holding all."""
    from gloo import spawn_gloo

    torch.manual_seed(4)
    teacher = torch.randn(6, 5, 7)
    loss = PatchLoss(7, center_momentum=0.5)
    masks = torch.zeros(6, 5, dtype=torch.bool)
    masks[:, 0] = True
    loss(teacher[masks] * 0, teacher[masks], teacher.mean((0, 1))[None], masks, teacher_temp=0.07)
    torch.testing.assert_close(loss.patch_center[0, 0], teacher.mean((0, 1)) * 0.5)
    spawn_gloo(_patch_center_split, teacher, loss.patch_center.clone())


@pytest.mark.parametrize("bn", [False, True])
def test_dinov2_teacher_patch_head_reads_the_masked_patches_only(tmp_path, bn):
    """DINOv2's patch term (Sinkhorn-Knopp, no center): the step's teacher runs its patch head on the masked
    patches only, as DINOv2's teacher does, with the same patch term as the head on every patch; a head with
    BatchNorm (its statistics span the batch) still runs on every patch."""
    import copy

    from test_end_to_end import ROOT, make_folder, tiny_overrides

    from ssl_distill.config import load_config
    from ssl_distill.engine.train import Trainer

    overrides = tiny_overrides(make_folder(tmp_path / "train", 4, 0), tmp_path / "run") + [
        f"model.use_bn_in_head={str(bn).lower()}", "model.drop_path_rate=0", "masking.pred_ratio=[0.3]",
        "masking.pred_ratio_var=[0.2]"]
    trainer = Trainer(load_config(ROOT / "configs" / "dinov2_style_tiny_fmnist.yaml", overrides))
    assert trainer.teacher_all_patches is bn
    trainer.sampler.set_epoch(0)
    inputs = trainer.step_inputs(next(iter(trainer.loader)))
    twin = copy.deepcopy(trainer)
    twin.teacher_all_patches = True  # the iBOT path: the head on every patch, the masked rows' logits read out
    rows: list[int] = []
    hook = trainer.teacher.patch_head.mlp.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
    record = trainer.train_step(inputs[0], 0, *inputs[1:])
    hook.remove()
    reference = twin.train_step(inputs[0], 0, *inputs[1:])
    masks = torch.cat(inputs[1])
    assert 0 < masks.sum() < masks.numel()
    assert rows == [masks.numel() if bn else int(masks.sum())]
    assert record["patch"] == pytest.approx(reference["patch"], rel=1e-5)
    assert record["loss"] == pytest.approx(reference["loss"], rel=1e-5)
