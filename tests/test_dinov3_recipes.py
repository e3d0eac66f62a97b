"""DINOv3 recipes: continuing from a released backbone (student = teacher = Gram teacher = the file, the fresh
heads' warm-up on the held-still backbone, a bit-identical resume), and the settings such a run refuses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinov3_reference import random_dinov3
from ssl_distill.checkpoints import load_file
from ssl_distill.config import ConfigError, load_config
from ssl_distill.engine.train import Trainer, train
from test_end_to_end import ROOT, make_folder

CONTINUE = ROOT / "configs" / "dinov3_vits16_continue.yaml"


def continue_overrides(data: Path, out: Path, release: Path) -> list[str]:
    """The continue recipe at test size: a 192-wide, 2-block DINOv3 ViT with patch 8 (the stand-in release's
    architecture), 32 / 16 px crops, small heads, 2 backbone-frozen steps of a 4-step run."""
    return [f"data.train_dir={data}", f"run.output_dir={out}", f"model.init_from={release}", "run.progress=false",
            "run.log_every=1", "run.threads=1", "run.precision=fp32", "data.batch_size=4", "data.num_workers=0",
            "model.embed_dim=192", "model.num_heads=3", "model.depth=2", "model.patch_size=8", "model.img_size=32",
            "data.crops.global_size=32", "data.crops.local_size=16", "data.crops.n_local=2",
            "data.crops.gram_size=32", "model.out_dim=64", "ibot.patch_out_dim=64", "model.hidden_dim=32",
            "model.bottleneck_dim=16", "masking.max_block_patches=8", "optim.epochs=1", "optim.warmup_epochs=0",
            "optim.lr=1e-4", "optim.freeze_backbone_steps=2"]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], Path]:
    """(a released-layout DINOv3 file at random weights with bf16 periods, its state dict, a folder of 16 images)."""
    base = tmp_path_factory.mktemp("continue")
    ref = random_dinov3(0, dim=192, depth=2, heads=3, patch=8, bf16_periods=True)
    path = base / "dinov3_vit_pretrain.pth"
    torch.save(ref.state_dict(), path)
    return path, ref.state_dict(), make_folder(base / "images", 8, seed=0)


def _same_backbones(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_continue_starts_student_teacher_and_gram_teacher_as_the_released_file(release, tmp_path):
    path, official, data = release
    trainer = Trainer(load_config(CONTINUE, continue_overrides(data, tmp_path / "run", path)))
    student, teacher, gram = trainer.student.backbone, trainer.teacher.backbone, trainer.gram.backbone
    assert trainer.gram.ready and not gram.training and not any(p.requires_grad for p in gram.parameters())
    assert _same_backbones(student, teacher) and _same_backbones(student, gram)
    for bb in (student, gram):  # the file's values, its mask token and bf16-rounded periods included
        assert torch.equal(bb.masked_embed, official["mask_token"])
        assert torch.equal(bb.vit.rope.periods, official["rope_embed.periods"])
        assert torch.equal(bb.vit.reg_token, official["storage_tokens"])
        assert torch.equal(bb.vit.blocks[1].mlp.fc2.weight, official["blocks.1.mlp.fc2.weight"])
        q, _, v = official["blocks.0.attn.qkv.bias"].chunk(3)
        assert torch.equal(bb.vit.blocks[0].attn.q_bias, q) and torch.equal(bb.vit.blocks[0].attn.v_bias, v)
    cfg = trainer.cfg  # the recipe's Gram schedule: the file as a frozen teacher from the first step, never refreshed
    assert trainer.sched.gram_weight[0] == cfg.gram.weight == 1.5 and trainer.sched.dino_local_weight[0] == 0.5
    assert cfg.gram.update_frequency == 0 and cfg.gram.it_load_ema_teacher == -1


def test_fresh_heads_learn_on_the_held_still_backbone_then_everything_trains(release, tmp_path):
    path, _, data = release
    out = tmp_path / "run"
    overrides = continue_overrides(data, out, path)
    trainer = Trainer(load_config(CONTINUE, [*overrides, "run.stop_at_step=2"]))
    start = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    gram_start = {k: v.clone() for k, v in trainer.gram.backbone.state_dict().items()}
    trainer.fit()
    backbone = [k for k in start if k.startswith("backbone.")]
    heads = [k for k in start if k.startswith(("head.", "patch_head.")) and start[k].is_floating_point()]
    moved = [k for k in heads if not torch.equal(trainer.student.state_dict()[k], start[k])]
    assert backbone and heads and len(moved) > len(heads) // 2  # the heads learn (the last layers included) ...
    for net in (trainer.student, trainer.teacher):  # ... while student and teacher backbones stay the file's
        state = net.state_dict()
        assert all(torch.equal(state[k], start[k]) for k in backbone)
    after = train(load_config(CONTINUE, [*overrides, "run.stop_at_step=3"]))  # step 2: the backbone trains too
    assert after["step"] == 3
    ckpt = load_file(out / "checkpoint.pth")
    assert any(not torch.equal(ckpt["student"][k], start[k]) for k in backbone)
    for key, value in gram_start.items():  # the Gram teacher stays the released file
        assert torch.equal(ckpt["gram"]["backbone"][key], value), key
    assert ckpt["gram"]["refreshes"] == 0


def test_the_held_still_backbone_runs_no_backward_and_the_run_is_the_same(release, tmp_path):
    """One process builds no graph through the backbone while it is held still (its backward is most of a step):
    the same checkpoint bit for bit as the full backward with the backbone's gradients dropped (what DDP runs),
    through the freeze and the step that ends it; the backbone's blocks see no backward in the held steps."""
    path, _, data = release
    runs = {}
    for skip in (True, False):
        trainer = Trainer(load_config(CONTINUE, [*continue_overrides(data, tmp_path / f"run{skip}", path),
                                                 "run.stop_at_step=3"]))
        assert trainer.skip_frozen_backward  # one process
        trainer.skip_frozen_backward = skip
        backward_calls: list[int] = []
        hook = trainer.student.backbone.vit.blocks[0].register_full_backward_hook(
            lambda *_: backward_calls.append(trainer.state.step))
        trainer.fit()
        hook.remove()
        # steps 0 and 1 hold the backbone; step 2 trains it (one backward per crop size, global and local)
        assert sorted(set(backward_calls)) == ([2] if skip else [0, 1, 2]), backward_calls
        assert all(p.requires_grad for p in trainer.student.backbone.parameters())
        runs[skip] = load_file(tmp_path / f"run{skip}" / "checkpoint.pth")
    for part in ("student", "teacher", "optimizer"):
        a, b = runs[True][part], runs[False][part]
        if part == "optimizer":
            a, b = a["state"], b["state"]
            assert a.keys() == b.keys()
            a = {f"{k}.{n}": v for k, s in a.items() for n, v in s.items()}
            b = {f"{k}.{n}": v for k, s in b.items() for n, v in s.items()}
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)


def test_without_the_freeze_the_backbone_moves_at_the_first_step(release, tmp_path):
    path, _, data = release
    trainer = Trainer(load_config(CONTINUE, [*continue_overrides(data, tmp_path / "run", path),
                                             "optim.freeze_backbone_steps=0", "run.stop_at_step=1"]))
    start = {k: v.clone() for k, v in trainer.student.backbone.state_dict().items()}
    trainer.fit()
    assert any(not torch.equal(v, start[k]) for k, v in trainer.student.backbone.state_dict().items())


@pytest.mark.slow
def test_a_continued_run_resumes_across_the_end_of_the_freeze_bit_identically(release, tmp_path):
    path, _, data = release
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(CONTINUE, continue_overrides(data, full, path)))
    train(load_config(CONTINUE, [*continue_overrides(data, part, path), "run.stop_at_step=1"]))  # inside the freeze
    train(load_config(CONTINUE, continue_overrides(data, part, path)))
    a, b = load_file(full / "checkpoint.pth"), load_file(part / "checkpoint.pth")
    assert a["step"] == b["step"] == 4
    for part_name in ("student", "teacher"):
        for key in a[part_name]:
            assert torch.equal(a[part_name][key], b[part_name][key]), (part_name, key)
    for key in a["loss"]:
        assert torch.equal(a["loss"][key], b["loss"][key]), key
    with pytest.raises(ConfigError, match=r"optim.freeze_backbone_steps: 2 -> 3"):  # part of the schedule
        Trainer(load_config(CONTINUE, [*continue_overrides(data, part, path), "optim.freeze_backbone_steps=3"]))


@pytest.mark.parametrize("overrides, match", [
    (["optim.freeze_backbone_steps=5"], "optim.freeze_backbone_steps=5 holds the backbone still .* model.init_from "
                                        "is null"),
    (["gram.weight=1", "gram.ckpt=model.init_from", "data.crops.gram_size=28"],
     "gram.ckpt=model.init_from takes the Gram teacher from the file the run starts from, but model.init_from is null"),
    (["optim.freeze_backbone_steps=-1", "model.init_from=x.pth"], "optim.freeze_backbone_steps=-1 is out of range"),
])
def test_settings_that_need_a_file_to_start_from_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "dino_tiny_fmnist.yaml", overrides)


@pytest.mark.parametrize("overrides, match", [
    (["optim.freeze_backbone_steps=4"], r"optim.freeze_backbone_steps=4 holds the backbone still to the end: the run "
                                        r"has 4 steps \(optim.epochs=1.0 x 4 batches of 4 images\)"),
    (["gram.start_step=4", "gram.it_load_ema_teacher=-1"], "gram.start_step=4 starts the Gram term after the last "
                                                           "step: the run has 4 steps"),
])
def test_step_keys_beyond_the_run_are_refused_once_its_length_is_known(release, tmp_path, overrides, match):
    path, _, data = release
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        Trainer(load_config(CONTINUE, [*continue_overrides(data, out, path), *overrides]))
    assert not out.exists()  # a refused start leaves no run behind


def test_a_gram_teacher_file_with_a_learned_position_embedding_is_refused_for_a_rope_run(release, tmp_path):
    """The continue recipe given a DINOv2 file (same width, depth and patch, registers and LayerScale, but a
    learned position embedding) as its Gram teacher: refused naming the keys, before any step."""
    from ssl_distill.checkpoints import CheckpointError
    from test_checkpoints_official import official_vit

    path, _, data = release
    dinov2 = tmp_path / "dinov2_vit_pretrain.pth"
    torch.save(official_vit(0, depth=2, patch=8, grid=4, width=192, layer_scale="ls", registers=4,
                            mask_token="dinov2"), dinov2)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"gram.ckpt=.*(missing|unexpected) keys.*this run's architecture"):
        Trainer(load_config(CONTINUE, [*continue_overrides(data, out, path), f"gram.ckpt={dinov2}"]))
    assert not out.exists()
