"""The objectives a config trains with, in the order their terms are logged.

They are chosen by their weights, so a recipe says what it trains with numbers, not names:
``dino.weight`` > 0 (the [CLS] cross-view term), ``odis.weight`` > 0 (the [OBJ] object term),
``ibot.weight`` > 0 (the masked patch term), ``dino.koleo_weight`` > 0 (DINOv2's KoLeo regularizer),
``gram.weight`` > 0 (DINOv3's Gram anchoring, whose weight follows its schedule).
"""
from __future__ import annotations

from torch import nn

from ..config import Config
from .dino import DINOLoss
from .gram import GramLoss
from .ibot import PatchLoss
from .koleo import KoLeoLoss
from .odis import ObjectLoss


def patch_out_dim(cfg: Config) -> int:
    """Prototypes the patch term sees: the CLS head's when shared, else the patch head's."""
    return cfg.model.out_dim if cfg.ibot.shared_head else cfg.ibot.patch_out_dim


def build_objectives(cfg: Config) -> nn.ModuleList:
    """The step's objectives, in the order their terms are logged."""
    c, d, p = cfg.data.crops, cfg.dino, cfg.ibot
    objectives: list[nn.Module] = []
    if d.weight > 0:
        objectives.append(DINOLoss(cfg.model.out_dim, c.n_global + c.n_local, c.n_global, d.student_temp,
                                   d.center_momentum, weight=d.weight, centering=d.centering))
    if cfg.odis.weight > 0:
        objectives.append(ObjectLoss(cfg.model.out_dim, c.n_global + c.n_local, c.n_global, d.student_temp,
                                     cfg.odis.center_momentum, weight=cfg.odis.weight))
    if p.weight > 0:
        objectives.append(PatchLoss(patch_out_dim(cfg), d.student_temp, p.center_momentum, weight=p.weight,
                                    centering=p.centering))
    if d.koleo_weight > 0:
        objectives.append(KoLeoLoss(c.n_global, weight=d.koleo_weight, n_views=c.n_global + c.n_local))
    g = cfg.gram
    if g.on:
        objectives.append(GramLoss(g.img_level, g.normalized, g.remove_neg, g.remove_only_teacher_neg,
                                   target="patch_global" if g.ema_teacher else "gram_patch",
                                   compute_stats=g.compute_stats))
    return nn.ModuleList(objectives)
