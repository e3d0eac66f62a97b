"""Models: the timm backbone wrappers (learned-position ViT, DINOv3's RoPE ViT) and their spec (to and from a
config's model section), projection heads, and the multi-crop wrapper."""
from .backbone import (
    OBJ_KEYS, VIT_SIZES, BackboneSpec, ObjAttention, TokenBackbone, ViTBackbone, config_from_spec, default_fused_attn,
    fill_obj_from_cls, spec_from_config,
)
from .build import POS_EMBEDS, build_backbone
from .heads import DINOHead, WeightNormLinear
from .multicrop import MultiCropModel, group_by_resolution
from .rope_backbone import RopeViTBackbone
from .sync_bn import SyncBatchNorm1d

__all__ = [
    "OBJ_KEYS",
    "VIT_SIZES",
    "BackboneSpec",
    "ObjAttention",
    "TokenBackbone",
    "ViTBackbone",
    "RopeViTBackbone",
    "POS_EMBEDS",
    "build_backbone",
    "config_from_spec",
    "spec_from_config",
    "default_fused_attn",
    "fill_obj_from_cls",
    "DINOHead",
    "WeightNormLinear",
    "MultiCropModel",
    "group_by_resolution",
    "SyncBatchNorm1d",
]
