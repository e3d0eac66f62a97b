"""Real ``Trainer`` steps against a DINO step written here from the paper's and main_dino.py's rules.

``Trainer.fit`` runs its own loop (loader, step counter, ``train_step``); each call of
``train_step`` is intercepted: the student, teacher, center and AdamW state are copied first, the
real step runs, then the same step is recomputed here and every student parameter, every teacher
parameter and the center must agree. What the reference writes itself (none of it read from the
package):

- the per-iteration values, from DINO's ``utils.cosine_scheduler`` (linear warmup from 0 over
  ``warmup_epochs * iters`` iterations including the end point, then a half cosine to the final
  value): lr (base scaled by batch / 256, to ``min_lr``), weight decay (``weight_decay`` ->
  ``weight_decay_end``), EMA momentum (``momentum_teacher`` -> 1); the teacher temperature warms up
  linearly from ``warmup_teacher_temp`` to ``teacher_temp`` (per iteration here, a documented
  choice of schedules.py; main_dino.py steps it per epoch) and stays there;
- the loss: cross-entropy between softmax((t - c) / tau_t) of each global teacher view and
  log_softmax(s / 0.1) of every *other* student view, averaged over the pairs; c <- 0.9 c + 0.1 mean(t);
- AdamW (torch's, betas (0.9, 0.999)) with DINO's ``get_params_groups``: weight decay on parameters
  that are neither ``*.bias`` nor 1-d, none on the others; frozen (requires_grad=False) left out;
- ``clip_gradients``: every gradient scaled separately to norm <= clip (coef clip / (norm + 1e-6));
- ``cancel_gradients_last_layer``: the head's ``last_layer`` gradients dropped (after clipping)
  while epoch < ``freeze_last_layer``;
- the EMA ``teacher <- m teacher + (1 - m) student`` over all parameters, after the student step.

The configuration makes every rule visible: lr warms up then decays, weight decay and momentum move
visibly within the 7 steps (momentum from 0.9), the teacher temperature warms up across them, the
clip bites for some parameters and not others, the steps straddle the end of the freeze window
(steps 0-3 frozen, 4-6 not), biases and norm weights start away from 0 / 1 (so decaying them would
show) and the teacher starts away from the student (so the EMA weight shows).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_distill.config import load_config
from ssl_distill.engine.train import Trainer

# the test's run
N_IMAGES, BATCH = 16, 4
ITERS = N_IMAGES // BATCH  # iterations per epoch
EPOCHS = 3
STEPS = 7  # steps 0..6: the freeze window (1 epoch) ends after step 3
LR, MIN_LR, WARMUP_EPOCHS = 0.32, 1e-4, 1  # base lr = 0.32 * 4 / 256 = 0.005
WD, WD_END = 0.1, 0.9
MOMENTUM = 0.9
WARMUP_TEMP, TEMP, WARMUP_TEMP_EPOCHS = 0.04, 0.07, 2
CLIP = 0.05
FREEZE_EPOCHS = 1
STUDENT_TEMP, CENTER_MOMENTUM = 0.1, 0.9
N_GLOBAL, N_LOCAL = 2, 2
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which main_dino.py uses


# ------------------------------------------------------------------ DINO's rules, written here
def dino_cosine(base: float, final: float, epochs: int, iters: int, warmup_epochs: int, i: int) -> float:
    """utils.cosine_scheduler(base, final, epochs, iters, warmup_epochs)[i], from its formula."""
    warm = warmup_epochs * iters
    if i < warm:
        return base * i / (warm - 1)  # np.linspace(0, base, warm)
    n = epochs * iters - warm
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (i - warm) / n))


def lr_at(i: int) -> float:
    return dino_cosine(LR * BATCH / 256.0, MIN_LR, EPOCHS, ITERS, WARMUP_EPOCHS, i)


def wd_at(i: int) -> float:
    return dino_cosine(WD, WD_END, EPOCHS, ITERS, 0, i)


def momentum_at(i: int) -> float:
    return dino_cosine(MOMENTUM, 1.0, EPOCHS, ITERS, 0, i)


def teacher_temp_at(i: int) -> float:
    warm = WARMUP_TEMP_EPOCHS * ITERS
    return WARMUP_TEMP + (TEMP - WARMUP_TEMP) * i / warm if i < warm else TEMP


def last_layer_frozen(i: int) -> bool:
    return i // ITERS < FREEZE_EPOCHS  # cancel_gradients_last_layer: epoch < freeze_last_layer


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    s = (student_out / STUDENT_TEMP).chunk(N_GLOBAL + N_LOCAL)
    t = F.softmax((teacher_out - center) / temp, dim=-1).detach().chunk(N_GLOBAL)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v, sv in enumerate(s):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(sv, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """DINO's get_params_groups: no weight decay on biases nor on 1-d (norm) parameters."""
    return not (name.endswith(".bias") or p.ndim == 1)


# ------------------------------------------------------------------ the run
def make_images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(N_IMAGES):
        base = rng.integers(0, 256, (5, 5, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((40, 40), Image.Resampling.BILINEAR)
        img.save(root / f"{i:02d}.png")
    return root


def build_trainer(tmp_path: Path, norm_last_layer: bool) -> Trainer:
    overrides = [
        f"data.train_dir={make_images(tmp_path / 'images')}", f"run.output_dir={tmp_path / 'run'}",
        "run.device=cpu", "run.precision=fp32", "run.progress=false", "run.threads=1", "run.seed=3",
        "run.checkpoint_every=1000", "run.log_every=1000", f"run.stop_at_step={STEPS}",
        f"data.batch_size={BATCH}", "data.num_workers=0",
        f"data.crops.n_global={N_GLOBAL}", f"data.crops.n_local={N_LOCAL}",
        "data.crops.global_size=32", "data.crops.local_size=16",
        "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32",
        "model.embed_dim=48", "model.num_heads=3",
        "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16", "model.drop_path_rate=0.2",
        f"model.norm_last_layer={str(norm_last_layer).lower()}", "model.use_bn_in_head=false",
        f"dino.student_temp={STUDENT_TEMP}", f"dino.center_momentum={CENTER_MOMENTUM}",
        f"dino.warmup_teacher_temp={WARMUP_TEMP}", f"dino.teacher_temp={TEMP}",
        f"dino.warmup_teacher_temp_epochs={WARMUP_TEMP_EPOCHS}",
        f"optim.epochs={EPOCHS}", f"optim.lr={LR}", f"optim.min_lr={MIN_LR}",
        f"optim.warmup_epochs={WARMUP_EPOCHS}", f"optim.weight_decay={WD}", f"optim.weight_decay_end={WD_END}",
        f"optim.momentum_teacher={MOMENTUM}", "optim.momentum_teacher_end=1.0",
        f"optim.clip_grad={CLIP}", f"optim.freeze_last_layer={FREEZE_EPOCHS}",
    ]
    trainer = Trainer(load_config(None, overrides), fresh=True)
    assert trainer.iters_per_epoch == ITERS
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.student.named_parameters():
            if p.ndim == 1 or name.endswith(".bias"):  # biases away from 0, norm weights away from 1
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        trainer.teacher.load_state_dict(trainer.student.state_dict())
        for p in trainer.teacher.parameters():  # teacher away from the student
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


def logits(out) -> torch.Tensor:
    """The head's CLS logits, whether the model returns them or a dict of named outputs."""
    return out["cls"] if isinstance(out, dict) else out


def center_of(trainer: Trainer) -> torch.Tensor:
    """The DINO center buffer, wherever the trainer keeps its loss."""
    if hasattr(trainer, "loss_fn"):
        return trainer.loss_fn.center
    centers = [b for n, b in trainer.objectives.named_buffers() if n.split(".")[-1] == "center"]
    assert len(centers) == 1, [n for n, _ in trainer.objectives.named_buffers()]
    return centers[0]


def snapshot(trainer: Trainer) -> dict:
    """Deep copies of everything a step reads: models, center, AdamW state by parameter name."""
    state = {name: copy.deepcopy(trainer.optimizer.state[p])
             for name, p in trainer.student.named_parameters() if p in trainer.optimizer.state}
    return {
        "student": copy.deepcopy(trainer.student),
        "teacher": copy.deepcopy(trainer.teacher),
        "center": center_of(trainer).clone(),
        "adam": state,
        "rng": torch.get_rng_state(),
    }


def reference_step(snap: dict, crops: list[torch.Tensor], step: int) -> dict:
    """One DINO iteration from first principles on the snapshot; returns what it used and produced."""
    student, teacher, center = snap["student"], snap["teacher"], snap["center"]
    lr, wd, m, temp = lr_at(step), wd_at(step), momentum_at(step), teacher_temp_at(step)

    rng_after = torch.get_rng_state()
    torch.set_rng_state(snap["rng"])  # the student's drop-path draws, as in the real step
    teacher_out = logits(teacher(crops[:N_GLOBAL]))
    student_out = logits(student(crops))
    torch.set_rng_state(rng_after)
    loss = dino_loss(student_out, teacher_out, center, temp)
    new_center = center * CENTER_MOMENTUM + teacher_out.detach().mean(0, keepdim=True) * (1 - CENTER_MOMENTUM)

    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    for _, p in named:
        p.grad = None
    loss.backward()

    clipped, unclipped = [], []
    with torch.no_grad():
        for n, p in named:
            if p.grad is None:
                continue
            norm = p.grad.norm(2)
            coef = CLIP / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
                clipped.append(n)
            else:
                unclipped.append(n)
    if last_layer_frozen(step):
        for n, p in named:
            if "last_layer" in n:
                p.grad = None

    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if decays(n, p)], "weight_decay": wd},
         {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}],
        lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=False,
    )
    for n, p in named:
        if n in snap["adam"]:
            opt.state[p] = copy.deepcopy(snap["adam"][n])
    opt.step()

    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
            pt.copy_(m * pt + (1 - m) * ps)
    return {"loss": loss.item(), "lr": lr, "wd": wd, "momentum": m, "teacher_temp": temp,
            "center": new_center, "clipped": clipped, "unclipped": unclipped}


def assert_models_equal(real: torch.nn.Module, ref: torch.nn.Module, what: str, step: int) -> None:
    ref_params = dict(ref.named_parameters())
    for name, p in real.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name].detach(), rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"step {step}: {what} {name}: {m}")


def check_drop_path(trainer: Trainer, crops: list[torch.Tensor]) -> None:
    """DINO builds the student with drop-path and the teacher without: in training mode the
    teacher's output is deterministic and the student's is not (RNG state restored afterwards)."""
    rng = torch.get_rng_state()
    with torch.no_grad():
        assert trainer.teacher.training and trainer.student.training
        t1, t2 = logits(trainer.teacher(crops[:N_GLOBAL])), logits(trainer.teacher(crops[:N_GLOBAL]))
        s1, s2 = logits(trainer.student(crops)), logits(trainer.student(crops))
    torch.set_rng_state(rng)
    assert torch.equal(t1, t2), "the teacher uses drop-path"
    assert not torch.equal(s1, s2), "the student does not use drop-path"


@pytest.mark.parametrize("norm_last_layer", [True, False], ids=["norm_last_layer", "learned_last_norm"])
def test_trainer_steps_match_dino_reference(tmp_path, norm_last_layer):
    trainer = build_trainer(tmp_path, norm_last_layer)
    real_step = trainer.train_step
    seen: list[int] = []
    bites: list[tuple[int, int]] = []

    def checked_step(crops, step, *args, **kwargs):
        assert step == len(seen), f"train_step got step {step} for the {len(seen)}-th iteration"
        snap = snapshot(trainer)
        last_before = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if "last_layer" in n}
        stats = real_step(crops, step, *args, **kwargs)
        ref = reference_step(snap, crops, step)

        # the schedule values the step used are DINO's at this iteration
        for key in ("lr", "wd", "momentum", "teacher_temp"):
            assert stats[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), (step, key)
        assert stats["loss"] == pytest.approx(ref["loss"], rel=1e-5), step
        # the optimizer really ran with them (weight decay only in the regularised group)
        groups = trainer.optimizer.param_groups
        assert [g["lr"] for g in groups] == pytest.approx([ref["lr"]] * 2, rel=1e-12)
        assert groups[0]["weight_decay"] == pytest.approx(ref["wd"], rel=1e-12) and groups[1]["weight_decay"] == 0.0

        # the snapshot's models now hold the reference step's result
        assert_models_equal(trainer.student, snap["student"], "student", step)
        assert_models_equal(trainer.teacher, snap["teacher"], "teacher", step)
        torch.testing.assert_close(center_of(trainer), ref["center"], rtol=1e-6, atol=1e-7)

        # the freeze window, directly: the last layer is untouched while frozen, and moves after
        moved = [not torch.equal(p.detach(), last_before[n])
                 for n, p in trainer.student.named_parameters() if n in last_before and p.requires_grad]
        assert moved, "no trainable last-layer parameter"
        if last_layer_frozen(step):
            assert not any(moved), f"step {step}: the last layer changed inside the freeze window"
        else:
            assert all(moved), f"step {step}: the last layer did not change after the freeze window"
        bites.append((len(ref["clipped"]), len(ref["unclipped"])))
        if step == 0:
            check_drop_path(trainer, crops)
        seen.append(step)
        return stats

    trainer.train_step = checked_step
    trainer.fit()
    assert seen == list(range(STEPS))
    assert [last_layer_frozen(s) for s in seen] == [True] * 4 + [False] * 3
    # the clip bit for some parameters and spared others at every step (so global-norm clipping differs)
    assert all(c > 0 and u > 0 for c, u in bites), bites
    # and the schedules moved over the steps (lr peaks at the last warmup step and the first cosine step)
    assert len({round(lr_at(s), 12) for s in seen}) == STEPS - 1 and teacher_temp_at(STEPS - 1) > teacher_temp_at(0)
