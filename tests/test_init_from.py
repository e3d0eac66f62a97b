"""model.init_from: a new run starts its backbone from a checkpoint (ours or official); heads start fresh."""
from __future__ import annotations

import pytest
import torch

from ssl_distill.config import load_config
from ssl_distill.engine.checkpoint import CheckpointError, load_file
from ssl_distill.engine.train import Trainer, train

from test_end_to_end import CONFIG, make_folder, tiny_overrides

IBOT = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0.3]", "masking.pred_ratio_var=[0.1]"]


def test_an_ibot_run_starts_from_a_dino_runs_teacher_backbone(tmp_path):
    data = make_folder(tmp_path / "data", 4, seed=0)
    dino = tmp_path / "dino"
    train(load_config(CONFIG, tiny_overrides(data, dino) + ["optim.epochs=1"]))
    teacher = load_file(dino / "checkpoint.pth")["teacher"]
    cfg = load_config(CONFIG, tiny_overrides(data, tmp_path / "ibot") + IBOT + [f"model.init_from={dino}"])
    trainer = Trainer(cfg)
    for net in (trainer.student, trainer.teacher):
        backbone = net.backbone.state_dict()
        for key, value in backbone.items():
            if key == "masked_embed":
                assert torch.count_nonzero(value) == 0  # iBOT's mask token starts at zero
            else:
                assert torch.equal(value, teacher[f"backbone.{key}"]), key
    # the head is not the DINO run's: it starts fresh
    assert not torch.equal(trainer.student.head.mlp[0].weight, teacher["head.mlp.0.weight"])


def test_a_backbone_that_does_not_fit_is_refused_naming_the_keys(tmp_path):
    data = make_folder(tmp_path / "data", 4, seed=0)
    dino = tmp_path / "dino"
    train(load_config(CONFIG, tiny_overrides(data, dino) + ["optim.epochs=1"]))
    cfg = load_config(CONFIG, tiny_overrides(data, tmp_path / "deeper") + ["model.depth=3", f"model.init_from={dino}"])
    with pytest.raises(CheckpointError, match=r"model.init_from=.*blocks\.2"):
        Trainer(cfg)
    assert not (tmp_path / "deeper").exists()  # a failed start leaves nothing behind
