"""What a config builds for training: the student / teacher networks, with what its objectives read.

The objectives themselves come from :func:`ssl_distill.objectives.build_objectives`; each declares
the outputs it reads (:class:`~ssl_distill.objectives.Reads`), and the networks get exactly the
parts those need.
"""
from __future__ import annotations

from ..config import Config
from ..models import DINOHead, MultiCropModel, build_backbone, spec_from_config
from ..objectives import Reads, build_objectives


def _head(cfg: Config, in_dim: int, out_dim: int) -> DINOHead:
    m = cfg.model
    return DINOHead(in_dim, out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim, nlayers=m.head_layers,
                    use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer)


def build_model(cfg: Config, drop_path: float, rope_rescale_coords: float | None = None) -> MultiCropModel:
    """Backbone + DINO head, and what the config's objectives read besides: the mask token and,
    unless shared, a separate patch head for a term on masked patches (iBOT); the [OBJ] token, through
    the CLS head, for an object term (ODIS). ``drop_path`` and ``rope_rescale_coords`` (a RoPE
    backbone's coordinate augmentation) are the student's; the teacher has neither."""
    reads = Reads.union(objective.reads for objective in build_objectives(cfg))
    backbone = build_backbone(spec_from_config(cfg, drop_path, rope_rescale_coords), mask_token=reads.patch_masks,
                              obj_token=reads.object_masks)
    head = _head(cfg, backbone.embed_dim, cfg.model.out_dim)
    separate = reads.patch_masks and not cfg.ibot.shared_head
    patch_head = _head(cfg, backbone.embed_dim, cfg.ibot.patch_out_dim) if separate else None
    return MultiCropModel(backbone, head, patch_head)
