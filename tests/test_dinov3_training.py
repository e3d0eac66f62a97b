"""Training a RoPE (DINOv3-architecture) backbone through the existing Trainer: DINO + iBOT terms on it, a stop and
a bit-identical resume, and ``model.init_from`` on an official DINOv3 file."""
from __future__ import annotations

import json
import math

import torch

from dinov3_reference import random_dinov3
from ssl_distill.checkpoints import load_file
from ssl_distill.config import load_config
from ssl_distill.engine.train import Trainer, train

from test_end_to_end import CONFIG, assert_same_teacher_and_center, make_folder, tiny_overrides

ROPE = ["model.pos_embed=rope", "model.reg_tokens=4", "model.layer_scale=1e-5"]
IBOT = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0,0.3]", "masking.pred_ratio_var=[0,0.2]"]


def test_a_rope_run_trains_stops_and_resumes_bit_identically(tmp_path):
    data = make_folder(tmp_path / "data", 4, seed=0)
    full, part = tmp_path / "full", tmp_path / "part"
    overrides = ROPE + IBOT + ["optim.warmup_epochs=0.5"]
    trainer = Trainer(load_config(CONFIG, tiny_overrides(data, full) + overrides + ["run.stop_at_step=4"]))
    student, teacher = trainer.student.backbone, trainer.teacher.backbone
    assert type(student).__name__ == "RopeViTBackbone" and student.masked_embed is not None
    # the student draws RoPE coordinate rescalings (official R = 2), the teacher never does
    assert student.vit.rope.rescale_coords == 2.0 and teacher.vit.rope.rescale_coords is None
    assert trainer.fit()["step"] == 4
    assert train(load_config(CONFIG, tiny_overrides(data, part) + overrides + ["run.stop_at_step=2"]))["step"] == 2
    assert train(load_config(CONFIG, tiny_overrides(data, part) + overrides + ["run.stop_at_step=4"]))["step"] == 4
    a, b = load_file(full / "checkpoint.pth"), load_file(part / "checkpoint.pth")
    assert_same_teacher_and_center(a, b)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    assert torch.equal(a["loss"]["patch_center"], b["loss"]["patch_center"])
    assert "backbone.vit.rope.periods" in a["teacher"] and "backbone.vit.blocks.0.attn.q_bias" in a["teacher"]
    log = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(r["loss"]) and math.isfinite(r["patch"]) for r in log)


def test_init_from_an_official_dinov3_file_starts_student_and_teacher_from_it(tmp_path):
    """student = teacher = the file's weights exactly (its bf16-rounded periods included), and the iBOT run's
    mask token starts as the file's ``mask_token``; heads start fresh."""
    data = make_folder(tmp_path / "data", 4, seed=0)
    ref = random_dinov3(0, dim=192, depth=2, heads=3, patch=8, bf16_periods=True)
    torch.save(ref.state_dict(), tmp_path / "dinov3_vit_pretrain.pth")
    cfg = load_config(CONFIG, tiny_overrides(data, tmp_path / "run") + ROPE + IBOT
                      + [f"model.init_from={tmp_path / 'dinov3_vit_pretrain.pth'}"])
    trainer = Trainer(cfg)
    official = ref.state_dict()
    for net in (trainer.student, trainer.teacher):
        bb = net.backbone
        assert torch.equal(bb.masked_embed, official["mask_token"])
        assert torch.equal(bb.vit.rope.periods, official["rope_embed.periods"])
        assert torch.equal(bb.vit.reg_token, official["storage_tokens"])
        assert torch.equal(bb.vit.blocks[1].gamma_2, official["blocks.1.ls2.gamma"])
        assert torch.equal(bb.vit.blocks[1].mlp.fc1.weight, official["blocks.1.mlp.fc1.weight"])
        q, _, v = official["blocks.0.attn.qkv.bias"].chunk(3)
        assert torch.equal(bb.vit.blocks[0].attn.q_bias, q) and torch.equal(bb.vit.blocks[0].attn.v_bias, v)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(trainer.teacher.backbone.eval()(x), ref.forward_features(x)["x_norm_clstoken"],
                                   rtol=1e-5, atol=1e-5)
