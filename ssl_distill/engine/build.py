"""What a config builds for training: the student / teacher networks and the list of objectives.

The objectives are chosen by their weights, so a recipe says what it trains with numbers, not names:
``dino.weight`` > 0 (the [CLS] cross-view term), ``ibot.weight`` > 0 (the masked patch term),
``odis.weight`` > 0 (the [OBJ] object term), ``dino.koleo_weight`` > 0 (DINOv2's KoLeo regularizer).
"""
from __future__ import annotations

from torch import nn

from ..config import Config
from ..models import DINOHead, MultiCropModel, ViTBackbone, spec_from_config
from ..objectives import DINOLoss, KoLeoLoss, ObjectLoss, PatchLoss


def uses_patches(cfg: Config) -> bool:
    """True when the run trains a masked patch objective (iBOT, AttMask, DINOv2-style)."""
    return cfg.ibot.weight > 0


def uses_objects(cfg: Config) -> bool:
    """True when the run trains ODIS's object term (an [OBJ] token, object-aware crops)."""
    return cfg.odis.weight > 0


def _head(cfg: Config, in_dim: int, out_dim: int) -> DINOHead:
    m = cfg.model
    return DINOHead(in_dim, out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim, nlayers=m.head_layers,
                    use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer)


def build_model(cfg: Config, drop_path: float) -> MultiCropModel:
    """Backbone + DINO head (+ iBOT's mask token and, unless shared, a separate patch head; + ODIS's
    [OBJ] token, through the CLS head)."""
    patches = uses_patches(cfg)
    backbone = ViTBackbone(spec_from_config(cfg, drop_path), mask_token=patches, obj_token=uses_objects(cfg))
    head = _head(cfg, backbone.embed_dim, cfg.model.out_dim)
    patch_head = _head(cfg, backbone.embed_dim, cfg.ibot.patch_out_dim) if patches and not cfg.ibot.shared_head else None
    return MultiCropModel(backbone, head, patch_head)


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
    if uses_objects(cfg):
        objectives.append(ObjectLoss(cfg.model.out_dim, c.n_global + c.n_local, c.n_global, d.student_temp,
                                     cfg.odis.center_momentum, weight=cfg.odis.weight))
    if uses_patches(cfg):
        objectives.append(PatchLoss(patch_out_dim(cfg), d.student_temp, p.center_momentum, weight=p.weight,
                                    centering=p.centering))
    if d.koleo_weight > 0:
        objectives.append(KoLeoLoss(c.n_global, weight=d.koleo_weight))
    return nn.ModuleList(objectives)
