"""``run.compile`` (issue 28): the transformer blocks compiled in place. Compiled and eager runs agree on every
parameter after several steps (drop-path on: the same draws), the checkpoint keeps the eager model's keys, a
run switches mode across a resume, and ``auto`` is measured once per run and kept in the checkpoint."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from ssl_distill.checkpoints import load_file
from ssl_distill.config import ConfigError, load_config
from ssl_distill.engine import train as train_module
from ssl_distill.engine.compile import compile_blocks, compile_wins, time_block
from ssl_distill.engine.train import Trainer, train

from test_dinov3_training import ROPE
from test_end_to_end import CONFIG, make_folder, tiny_overrides

BACKBONES = {"vit": [], "rope": ROPE}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_compiled_steps_agree_with_eager_ones_and_a_resume_switches_mode(backbone, tmp_path):
    data = make_folder(tmp_path / "data", 4, seed=0)
    over = BACKBONES[backbone] + ["optim.warmup_epochs=0.5", "run.checkpoint_every=1"]
    eager, mixed = tmp_path / "eager", tmp_path / "mixed"
    train(load_config(CONFIG, tiny_overrides(data, eager) + over + ["run.stop_at_step=4"]))
    compiled = Trainer(load_config(CONFIG, tiny_overrides(data, mixed) + over + ["run.stop_at_step=3",
                                                                                   "run.compile=on"]))
    assert compiled.compiled and compiled.fit()["step"] == 3  # 3 compiled steps, then 1 eager one
    assert load_file(mixed / "checkpoint.pth")["compile"] is True
    resumed = Trainer(load_config(CONFIG, tiny_overrides(data, mixed) + over + ["run.stop_at_step=4"]))
    assert not resumed.compiled and resumed.state.step == 3
    assert resumed.fit()["step"] == 4
    a, b = load_file(eager / "checkpoint.pth"), load_file(mixed / "checkpoint.pth")
    # AdamW moves a parameter by about lr a step whatever the gradient's size, so one whose gradient is 0 in exact
    # arithmetic (a bias before BatchNorm or a final LayerNorm's, the key bias) moves by rounding noise (its sign):
    # up to a few lr a step apart in the two runs; every other parameter agrees to float rounding
    adam_steps = 4 * float(sum(resumed.sched.lr[:4]))
    for net in ("student", "teacher"):
        assert list(a[net]) == list(b[net]) and not any("_orig_mod" in k for k in b[net])
        for key in a[net]:
            torch.testing.assert_close(b[net][key], a[net][key], rtol=1e-4, atol=adam_steps, msg=f"{net} {key}")
    logs = [{r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r}
            for run in (eager, mixed)]
    # the first two steps, compiled and eager (drop-path on: the compiled blocks draw its masks as eager ones do)
    assert logs[1][2] == pytest.approx(logs[0][2], rel=1e-3)


@pytest.mark.slow
def test_a_compiled_block_is_timed_against_the_eager_one(tmp_path):
    trainer = Trainer(load_config(CONFIG, tiny_overrides(make_folder(tmp_path / "data", 4, 0), tmp_path / "run")))
    eager, compiled, warmup = time_block(trainer.student.backbone, 4, 32, "fp32", reps=1)
    assert eager > 0 and compiled > 0 and warmup > 0
    assert all(not hasattr(b, "_compiled_call_impl") or b._compiled_call_impl is None
               for b in trainer.student.backbone.vit.blocks)  # timed on copies: the run's blocks stay eager


def test_auto_compiles_measurement_leaves_the_runs_random_stream_alone(tmp_path, monkeypatch):
    """The timed block copies draw drop path and RoPE coordinates: from a forked generator, so an ``auto`` run
    draws what an ``on`` / ``off`` run with its seed draws (compiling itself is stubbed: its cost is not the point)."""
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    overrides = [*tiny_overrides(make_folder(tmp_path / "data", 4, 0), tmp_path / "run"), *ROPE,
                 "model.drop_path_rate=0.5"]
    trainer = Trainer(load_config(CONFIG, overrides))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    compile_wins(trainer.student.backbone, 4, 32, "fp32")
    assert torch.equal(torch.get_rng_state(), before)


def test_auto_compile_is_chosen_once_per_run(tmp_path, monkeypatch):
    """``run.compile: auto`` measures at the start and the checkpoint keeps the choice; a resume keeps it even where
    the timing would now say otherwise; ``on`` / ``off`` override it (the measurement and the compiler stubbed:
    what they do is the slow tests')."""
    compiled: list[int] = []
    monkeypatch.setattr(train_module, "compile_blocks", lambda backbones: compiled.append(len(list(backbones))))
    monkeypatch.setattr(train_module, "compile_wins", lambda *a: (True, "faster"))
    over = tiny_overrides(make_folder(tmp_path / "data", 4, 0), tmp_path / "run") + ["run.compile=auto"]
    first = Trainer(load_config(CONFIG, over + ["run.stop_at_step=2"]))
    assert first.compiled and compiled == [2]  # student and teacher
    first.fit()
    assert load_file(tmp_path / "run" / "checkpoint.pth")["compile"] is True
    monkeypatch.setattr(train_module, "compile_wins", lambda *a: (False, "slower"))
    assert Trainer(load_config(CONFIG, over)).compiled
    assert not Trainer(load_config(CONFIG, over + ["run.compile=off"])).compiled
    assert not Trainer(load_config(CONFIG, over), fresh=True).compiled  # a new run measures again
    with pytest.raises(ConfigError, match="run.compile must be off, on or auto"):
        load_config(CONFIG, over + ["run.compile=fast"])


@pytest.mark.slow
def test_compiled_blocks_draw_drop_path_as_eager_ones(tmp_path):
    """The same seed drops the same samples' residual branches in a compiled backbone as in the eager one."""
    trainer = Trainer(load_config(CONFIG, tiny_overrides(make_folder(tmp_path / "data", 4, 0), tmp_path / "run")
                                  + ["model.drop_path_rate=0.5"]))
    eager = trainer.student.backbone.train()
    compiled = copy.deepcopy(eager)
    compile_blocks([compiled])
    x = torch.randn(64, 3, 32, 32)
    compiled.forward_tokens(x)  # compiles
    outs = []
    for backbone in (eager, compiled):
        torch.manual_seed(1)
        outs.append(backbone.forward_tokens(x)["patch"])
    torch.manual_seed(2)
    other = eager.forward_tokens(x)["patch"]
    assert (other - outs[0]).abs().amax(dim=(1, 2)).gt(1e-3).sum() > 8  # another seed: other samples dropped
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
