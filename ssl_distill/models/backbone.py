"""ViT backbone: a thin wrapper over timm's ``VisionTransformer``.

The wrapper adds what self-distillation needs and timm does not name directly: the CLS and patch
tokens as named outputs, any input resolution (position embeddings interpolated by timm's
``dynamic_img_size``), and a switch between the fused attention kernel and the plain
matmul-softmax path (on CPU the plain path's backward is about 2x faster, measured here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# (embed_dim, depth, num_heads) of the standard ViT sizes (Dosovitskiy et al. 2021; DeiT tiny/small).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone (stored in checkpoints)."""

    arch: str = "vit_small"
    patch_size: int = 16
    img_size: int = 224
    depth: int | None = None  # overrides the arch's depth when set
    embed_dim: int | None = None  # overrides the arch's width when set
    num_heads: int | None = None  # overrides the arch's head count when set
    drop_path_rate: float = 0.0

    def dims(self) -> tuple[int, int, int]:
        if self.arch not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {self.arch!r}; choose one of {sorted(VIT_SIZES)}")
        width, depth, heads = VIT_SIZES[self.arch]
        return (self.embed_dim or width, self.depth or depth, self.num_heads or heads)


class ViTBackbone(nn.Module):
    """timm ViT returning named tokens for batches of same-size crops.

    ``forward(x)`` with ``x`` of shape (B, 3, H, W), H and W multiples of the patch size, returns the
    CLS token after the final norm, shape (B, D). ``forward_tokens`` also returns the patch tokens.
    """

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        width, depth, heads = spec.dims()
        self.vit = VisionTransformer(
            img_size=spec.img_size,
            patch_size=spec.patch_size,
            num_classes=0,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=spec.drop_path_rate,
            dynamic_img_size=True,
        )
        # DINO initialises the class token like the position embedding (trunc normal, std 0.02);
        # timm uses std 1e-6. Follow DINO.
        nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
        self.embed_dim = width
        self.patch_size = spec.patch_size
        self.num_prefix_tokens = self.vit.num_prefix_tokens

    def set_fused_attn(self, fused: bool) -> None:
        """Choose the fused SDPA kernel (fast on CUDA) or the plain matmul-softmax path (fast on CPU)."""
        for blk in self.vit.blocks:
            blk.attn.fused_attn = fused

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"cls": (B, D), "patch": (B, H/p * W/p, D)}, both after the final norm."""
        tokens = self.vit.forward_features(x)
        return {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens :]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> CLS features (B, D)."""
        return self.vit.forward_features(x)[:, 0]


def default_fused_attn(device: torch.device) -> bool:
    """Fused attention on CUDA; the plain path on CPU, where its backward is twice as fast."""
    return device.type == "cuda"
