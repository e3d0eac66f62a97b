"""Gram anchoring's frozen teacher (DINOv3, ``dinov3/train/ssl_meta_arch.py`` and ``train/train.py``).

A backbone of the run's architecture, frozen, in eval mode, run without gradients on the batch's Gram
crops (the global views again, at ``data.crops.gram_size``). Its weights come from a file
(``gram.ckpt``: ours or an official backbone, read like ``model.init_from``) or from the EMA teacher
before step ``gram.it_load_ema_teacher`` (its whole backbone state); after that, they are refreshed from
the EMA teacher after the optimizer step and the EMA update of step ``it`` when :func:`refresh_due` says
so (parameters only, as the official ``update_gram``). Its weights, whether it holds any yet, and the
refresh count are part of the training checkpoint, so a resume across a refresh continues exactly.

``gram.ema_teacher=true`` needs none of this: the Gram term then reads the EMA teacher's own patch
tokens of the global views, and no :class:`GramTeacher` is built.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..checkpoints import CheckpointError, load_state_strict
from ..config import Config, GramConfig
from .build import load_backbone_weights


def refresh_due(gram: GramConfig, step: int, refreshes: int) -> bool:
    """Whether the Gram teacher is refreshed after step ``step`` (0-based), ``refreshes`` having been done.

    As DINOv3's loop: every ``update_frequency``-th step counted from 1 (``(step + 1) % update_frequency
    == 0``), once ``step + 1 >= it_first_update``, at most ``max_updates`` times (null: no limit).
    """
    return (gram.update_frequency > 0 and step + 1 >= gram.it_first_update
            and (step + 1) % gram.update_frequency == 0
            and (gram.max_updates is None or refreshes < gram.max_updates))


class GramTeacher:
    """The frozen Gram teacher of a run (see the module docstring).

    Args:
        cfg: the run's config (its ``gram`` section).
        teacher_backbone: the EMA teacher's backbone; the Gram teacher starts as a frozen copy of it (the
            architecture and its settings, but the attention kernel: always the fused one), holding no weights of
            its own until :meth:`load_file` or the snapshot step.
    """

    def __init__(self, cfg: Config, teacher_backbone: nn.Module) -> None:
        self.gram = cfg.gram
        self.backbone = copy.deepcopy(teacher_backbone).eval()
        for p in self.backbone.parameters():
            p.requires_grad = False
        # forward only: the fused attention kernel, whatever the run's model.fused_attn (on the CPU the plain path
        # is chosen for its backward, which this backbone never runs); at DINOv3's 2x crops (448 px, 789 tokens
        # for ViT-S/16 with registers) the Gram teacher's forward took 4.10 s fused against 4.49 s plain (batch 16,
        # bf16, 2-core AMD EPYC); at the tiny recipes' 69 tokens a block took 50 ms against 48
        self.backbone.set_fused_attn(True)
        self.ready = False  # holds a teacher's weights (the file's, or the EMA teacher's)
        self.refreshes = 0

    def load_file(self, path: str) -> str:
        """Take the weights of the backbone file or run directory ``path``; returns a sentence saying what
        was read. A backbone of another architecture raises CheckpointError naming the keys that do not fit."""
        try:
            with torch.random.fork_rng(devices=[]):  # building the file's model draws no number of the run's
                loaded, resampled = load_backbone_weights(self.backbone, path, f"gram.ckpt={path}")
        except CheckpointError as e:
            raise CheckpointError(f"{e}. The Gram teacher is a backbone of this run's architecture (the model "
                                  "section): give gram.ckpt a file of that architecture") from e
        self.ready = True
        return (f"Gram teacher loaded from {path} ({loaded.format}, {loaded.source})"
                + (f"; {resampled}" if resampled else ""))

    @torch.no_grad()
    def before_step(self, step: int, teacher_backbone: nn.Module) -> bool:
        """Copy the EMA teacher's backbone state in before step ``gram.it_load_ema_teacher``; returns whether it did."""
        if step != self.gram.it_load_ema_teacher:
            return False
        self.backbone.load_state_dict(teacher_backbone.state_dict())
        self.ready = True
        return True

    @torch.no_grad()
    def after_step(self, step: int, teacher_backbone: nn.Module) -> bool:
        """After step ``step``'s optimizer step and EMA update: refresh from the EMA teacher's parameters
        when :func:`refresh_due`; returns whether it did."""
        if not refresh_due(self.gram, step, self.refreshes):
            return False
        ours = list(self.backbone.parameters())
        theirs = [p.detach() for p in teacher_backbone.parameters()]
        if len(ours) != len(theirs):
            raise RuntimeError("the Gram teacher and the EMA teacher have different parameter lists")
        torch._foreach_copy_(ours, theirs)
        self.refreshes += 1
        return True

    @torch.no_grad()
    def patches(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """The n_global Gram crops (B, 3, g, g) each -> (n_global * B, (g / p)^2, D) final-norm patch
        tokens, crop-major like the global views."""
        if not self.ready:
            raise RuntimeError("the Gram teacher holds no weights yet (gram.ckpt or gram.it_load_ema_teacher)")
        return self.backbone.forward_tokens(torch.cat(crops))["patch"]

    def state_dict(self) -> dict[str, Any]:
        """What the training checkpoint keeps under ``"gram"``."""
        return {"backbone": self.backbone.state_dict(), "ready": self.ready, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any], what: str) -> None:
        """The inverse of :meth:`state_dict`; ``what`` names the checkpoint in errors."""
        load_state_strict(self.backbone, state["backbone"], f"{what}: Gram teacher")
        self.ready = bool(state["ready"])
        self.refreshes = int(state["refreshes"])
