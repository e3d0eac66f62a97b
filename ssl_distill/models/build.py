"""The backbone a spec describes: a learned-position ViT (:class:`ViTBackbone`) or DINOv3's RoPE ViT
(:class:`RopeViTBackbone`), chosen by ``spec.pos_embed``."""
from __future__ import annotations

from .backbone import BackboneSpec, ObjAttention, TokenBackbone, ViTBackbone
from .rope_backbone import RopeViTBackbone

__all__ = ["POS_EMBEDS", "build_backbone"]

POS_EMBEDS: dict[str, type[TokenBackbone]] = {"learned": ViTBackbone, "rope": RopeViTBackbone}


def build_backbone(spec: BackboneSpec, init_weights: bool = True, mask_token: bool = False,
                   obj_token: bool = False, obj_attention: ObjAttention | None = None) -> TokenBackbone:
    """The backbone of ``spec``; the arguments are those of :class:`ViTBackbone`, and ``obj_attention`` the
    [OBJ] token's attention pattern (None: :class:`ObjAttention`'s defaults, the authors')."""
    if spec.pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {sorted(POS_EMBEDS)}, got {spec.pos_embed!r}")
    backbone = POS_EMBEDS[spec.pos_embed](spec, init_weights=init_weights, mask_token=mask_token, obj_token=obj_token)
    if obj_attention is not None:
        backbone.obj_attention = obj_attention
    return backbone
