"""Training a RoPE (DINOv3-architecture) backbone through the existing Trainer: DINO + iBOT terms on it, a stop and
a bit-identical resume."""
from __future__ import annotations

import json
import math

import torch

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
