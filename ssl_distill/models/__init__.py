"""Models: the timm ViT backbone wrapper, projection heads, and the multi-crop wrapper."""
from .backbone import VIT_SIZES, BackboneSpec, ViTBackbone, default_fused_attn
from .heads import DINOHead, WeightNormLinear
from .multicrop import MultiCropModel, group_by_resolution
from .sync_bn import SyncBatchNorm1d

__all__ = [
    "VIT_SIZES",
    "BackboneSpec",
    "ViTBackbone",
    "default_fused_attn",
    "DINOHead",
    "WeightNormLinear",
    "MultiCropModel",
    "group_by_resolution",
    "SyncBatchNorm1d",
]
