"""model.init_from: a new run starts its backbone from a checkpoint (ours or official); heads start fresh."""
from __future__ import annotations

import pytest
import torch

from ssl_distill.checkpoints import CheckpointError, load_file
from ssl_distill.config import load_config
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


@pytest.mark.parametrize("interp", ["timm", "dino"])
def test_a_file_trained_at_another_size_starts_with_its_position_embedding_resampled(tmp_path, interp):
    """A 32-px run (4x4 patches) starts a 48-px run (6x6): the new backbone at 48 px computes exactly
    what the file's backbone computes at 48 px, which interpolates its own 4x4 embedding the same way."""
    data = make_folder(tmp_path / "data", 4, seed=0)
    small = tmp_path / "small"
    interp_key = [f"model.pos_interp={interp}"]
    train(load_config(CONFIG, tiny_overrides(data, small) + interp_key + ["optim.epochs=1"]))
    big = ["model.img_size=48", "data.crops.global_size=48", "data.crops.local_size=24"]
    trainer = Trainer(load_config(CONFIG, tiny_overrides(data, tmp_path / "big") + interp_key + big
                                  + [f"model.init_from={small}"]))
    assert trainer.student.backbone.vit.pos_embed.shape == (1, 1 + 36, 192)
    from ssl_distill.checkpoints import load_any_backbone

    file_backbone = load_any_backbone(small / "checkpoint.pth", "teacher").backbone.eval()
    ours = trainer.teacher.backbone.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), file_backbone(x), rtol=1e-5, atol=1e-5)
