"""ViT backbone: a thin wrapper over timm's ``VisionTransformer``.

The wrapper adds what self-distillation needs and timm does not name directly: the CLS and patch
tokens as named outputs, the normalized tokens of the last ``n`` blocks (DINO's
``get_intermediate_layers``), any input resolution (position embeddings interpolated), and a switch
between the fused attention kernel and the plain matmul-softmax path (on CPU the plain path's
backward is about 2x faster, measured here).

Architecture variants of the official releases are built with timm's own options:

- layer scale (DINOv2, iBOT with ``init_values``): ``init_values`` -> ``blocks.i.ls1.gamma`` / ``ls2.gamma``;
- register tokens (DINOv2 ``_reg4``): ``reg_tokens`` + ``no_embed_class`` (the position embedding covers
  the patches only; the class token carries its own position term), as timm's ``*_reg4_dinov2`` models;
- SwiGLU feed-forward (DINOv2 ViT-g): ``mlp_layer=SwiGLUPacked`` with SiLU, ``fc1`` holding both halves;
- any patch size (14 for DINOv2) and stored position-embedding size (518 px for DINOv2).

Position-embedding interpolation for other input sizes (``BackboneSpec.pos_interp``):

- ``"timm"``: timm's ``resample_abs_pos_embed`` (bicubic, antialiased, to the target grid size). This is
  what our own training uses, and what DINOv2's register models do (``interpolate_antialias=True``,
  ``interpolate_offset=0``).
- ``"dino"``: DINO / iBOT / DINOv2 (no registers) ``interpolate_pos_encoding``: bicubic without
  antialiasing, driven by the scale factor ``(grid + 0.1) / stored_grid``; the stored embedding is used
  unchanged at its own grid size. Needed to reproduce those models' features at, e.g., 224 px.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# (embed_dim, depth, num_heads) of the standard ViT sizes (Dosovitskiy et al. 2021; DeiT tiny/small;
# DINOv2's "giant2": width 1536, 40 blocks, 24 heads of 64).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
    "vit_giant": (1536, 40, 24),
}
MLP_LAYERS = ("mlp", "swiglu")
POS_INTERP = ("timm", "dino")


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
    mlp_ratio: float = 4.0  # hidden width / embed_dim; for "swiglu" the packed width (both halves)
    mlp_layer: str = "mlp"  # "mlp" (GELU) | "swiglu" (DINOv2 ViT-g: SiLU-gated, packed fc1)
    qkv_bias: bool = True
    layer_scale: float | None = None  # layer-scale init value (None: no layer scale)
    reg_tokens: int = 0  # register tokens (DINOv2 _reg4: 4)
    no_embed_class: bool = False  # position embedding without the prefix tokens (set with registers)
    pos_interp: str = "timm"  # "timm" | "dino": see the module docstring

    def dims(self) -> tuple[int, int, int]:
        if self.arch not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {self.arch!r}; choose one of {sorted(VIT_SIZES)}")
        width, depth, heads = VIT_SIZES[self.arch]
        return (self.embed_dim or width, self.depth or depth, self.num_heads or heads)

    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP (for SwiGLU: fc1's output, both halves)."""
        return int(round(self.dims()[0] * self.mlp_ratio))

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of timm's ``VisionTransformer`` for this backbone (no classifier head)."""
        if self.mlp_layer not in MLP_LAYERS:
            raise ValueError(f"mlp_layer must be one of {MLP_LAYERS}, got {self.mlp_layer!r}")
        if self.pos_interp not in POS_INTERP:
            raise ValueError(f"pos_interp must be one of {POS_INTERP}, got {self.pos_interp!r}")
        width, depth, heads = self.dims()
        if width % heads:
            raise ValueError(f"embed_dim {width} is not divisible by num_heads {heads}")
        hidden = self.mlp_hidden()
        # timm computes int(width * mlp_ratio); nudge the ratio so that float rounding cannot lose a unit
        ratio = self.mlp_ratio if int(width * self.mlp_ratio) == hidden else (hidden + 0.5) / width
        kwargs: dict[str, Any] = dict(
            img_size=self.img_size, patch_size=self.patch_size, num_classes=0, embed_dim=width, depth=depth,
            num_heads=heads, mlp_ratio=ratio, qkv_bias=self.qkv_bias, drop_path_rate=self.drop_path_rate,
        )
        if self.layer_scale is not None:
            kwargs["init_values"] = self.layer_scale
        if self.reg_tokens:
            kwargs["reg_tokens"] = self.reg_tokens
        if self.no_embed_class:
            kwargs["no_embed_class"] = True
        if self.mlp_layer == "swiglu":
            kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        return kwargs


def resample_pos_embed_dino(pos: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                            num_prefix_tokens: int, offset: float = 0.1) -> torch.Tensor:
    """DINO's position-embedding interpolation: bicubic, no antialiasing, scale factor (new + offset) / old.

    ``pos`` is (1, prefix + old_h * old_w, D); the prefix entries are kept as they are.
    """
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    dim = pos.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    scale = ((new_grid[0] + offset) / old_grid[0], (new_grid[1] + offset) / old_grid[1])
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != tuple(new_grid):  # float rounding of the scale factor
        raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {new_grid}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


class _VisionTransformer(VisionTransformer):
    """timm's VisionTransformer with a choice of position-embedding interpolation (same parameters)."""

    pos_interp: str = "timm"

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_interp == "timm" or self.pos_embed is None or not self.dynamic_img_size:
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        old = tuple(self.patch_embed.grid_size)
        pos = self.pos_embed
        prefix_in_pos = 0 if self.no_embed_class else self.num_prefix_tokens
        if (h, w) != old:
            pos = resample_pos_embed_dino(pos, (h, w), old, prefix_in_pos)
        x = x.view(b, -1, c)
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(b, -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(b, -1, -1))
        if self.no_embed_class:
            x = x + pos
            x = torch.cat(to_cat + [x], dim=1) if to_cat else x
        else:
            x = torch.cat(to_cat + [x], dim=1) if to_cat else x
            x = x + pos
        return self.pos_drop(x)


class ViTBackbone(nn.Module):
    """timm ViT returning named tokens for batches of same-size crops.

    ``forward(x)`` with ``x`` of shape (B, 3, H, W), H and W multiples of the patch size, returns the
    CLS token after the final norm, shape (B, D). ``forward_tokens`` also returns the patch tokens (and
    the register tokens when the model has some); ``get_intermediate_layers`` the tokens of the last
    ``n`` blocks.
    """

    def __init__(self, spec: BackboneSpec, init_weights: bool = True, mask_token: bool = False) -> None:
        """``init_weights=False`` skips the random initialisation (the weights are loaded right after).

        ``mask_token`` adds iBOT's learned ``masked_embed`` (1, D), zero-initialised as iBOT, which
        replaces the patch embeddings of masked positions (see :meth:`forward_tokens`).
        """
        super().__init__()
        self.spec = spec
        kwargs = spec.timm_kwargs()
        self.vit = _VisionTransformer(dynamic_img_size=True, weight_init="" if init_weights else "skip", **kwargs)
        self.vit.pos_interp = spec.pos_interp
        if init_weights:
            # DINO initialises the class token like the position embedding (trunc normal, std 0.02);
            # timm uses std 1e-6. Follow DINO.
            nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
        self.embed_dim = kwargs["embed_dim"]
        self.depth = kwargs["depth"]
        self.patch_size = spec.patch_size
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.num_reg_tokens = spec.reg_tokens
        self.masked_embed = nn.Parameter(torch.zeros(1, self.embed_dim)) if mask_token else None

    def set_fused_attn(self, fused: bool) -> None:
        """Choose the fused SDPA kernel (fast on CUDA) or the plain matmul-softmax path (fast on CPU)."""
        for blk in self.vit.blocks:
            blk.attn.fused_attn = fused

    def _split(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens :]}
        if self.num_reg_tokens:
            out["reg"] = tokens[:, 1 : self.num_prefix_tokens]
        return out

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       cls_attention: bool = False) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"cls": (B, D), "patch": (B, P, D)}, both after the final norm; P = H/p * W/p.

        Models with register tokens also return ``"reg"``: (B, R, D).

        Args:
            mask: (B, P) bool, True where the patch embedding is replaced by ``masked_embed`` before
                the position embedding is added (iBOT, Zhou et al. 2022, Sec. 3.2); needs ``mask_token``.
            cls_attention: also return ``"cls_attention"`` (B, P): the last block's attention of the
                CLS query over the patches, averaged over heads (AttMask, Kakogeorgiou et al. 2022,
                Sec. 3.2), from this same forward. Only the CLS row is computed: one extra key
                projection of the last block's input, no attention matrix is kept.
        """
        v = self.vit
        if mask is None and not cls_attention:
            return self._split(v.forward_features(x))
        h = v.patch_embed(x)  # (B, H/p, W/p, D): dynamic image size keeps the grid
        if mask is not None:
            if self.masked_embed is None:
                raise ValueError("a patch mask needs a backbone built with mask_token=True")
            h = torch.where(mask.view(*h.shape[:-1], 1), self.masked_embed.to(h.dtype), h)
        h = v.norm_pre(v.patch_drop(v._pos_embed(h)))
        for blk in v.blocks[:-1]:
            h = blk(h)
        attention = self._cls_attention(v.blocks[-1], h) if cls_attention else None
        out = self._split(v.norm(v.blocks[-1](h)))
        if attention is not None:
            out["cls_attention"] = attention
        return out

    def _cls_attention(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) input of ``block`` -> (B, P) its CLS -> patch attention, mean over heads."""
        attn = block.attn
        x = block.norm1(h)
        d = attn.num_heads * attn.head_dim
        w, b = attn.qkv.weight, attn.qkv.bias
        q = F.linear(x[:, :1], w[:d], None if b is None else b[:d])  # (B, 1, D) the CLS query only
        k = F.linear(x, w[d : 2 * d], None if b is None else b[d : 2 * d])  # (B, T, D)
        bsz, t, _ = x.shape
        q = attn.q_norm(q.view(bsz, 1, attn.num_heads, attn.head_dim).transpose(1, 2))
        k = attn.k_norm(k.view(bsz, t, attn.num_heads, attn.head_dim).transpose(1, 2))
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (B, heads, 1, T)
        return weights[:, :, 0, self.num_prefix_tokens :].mean(dim=1)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1, norm: bool = True) -> list[torch.Tensor]:
        """Token sequences (B, T, D) output by the last ``n`` blocks, oldest first (DINO's method).

        ``T = num_prefix_tokens + patches`` ([CLS, registers..., patches]); with ``norm`` each output goes
        through the final LayerNorm, as DINO and DINOv2 do for linear evaluation.
        """
        if not 1 <= n <= self.depth:
            raise ValueError(f"n must be in [1, {self.depth}], got {n}")
        v = self.vit
        h = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        outputs = []
        for i, blk in enumerate(v.blocks):
            h = blk(h)
            if i >= self.depth - n:
                outputs.append(v.norm(h) if norm else h)
        return outputs

    def forward_last_blocks(self, x: torch.Tensor, n: int = 1) -> dict[str, torch.Tensor]:
        """{"cls": (B, n, D) CLS of the last n blocks (oldest first), "patch": (B, P, D) last block's patches}.

        Everything after the final norm; registers are excluded from ``patch``.
        """
        outs = self.get_intermediate_layers(x, n)
        return {"cls": torch.stack([o[:, 0] for o in outs], dim=1), "patch": outs[-1][:, self.num_prefix_tokens :]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> CLS features (B, D)."""
        return self.vit.forward_features(x)[:, 0]


def default_fused_attn(device: torch.device) -> bool:
    """Fused attention on CUDA; the plain path on CPU, where its backward is twice as fast."""
    return device.type == "cuda"


def standard_heads(width: int) -> int | None:
    """Head count of the standard ViT of this width (64-wide heads otherwise), None if not divisible."""
    for w, _, heads in VIT_SIZES.values():
        if w == width:
            return heads
    return width // 64 if width % 64 == 0 else None


def arch_for_width(width: int) -> str:
    """Name of the standard size with this width (``vit_small`` when none matches; dims are explicit then)."""
    for name, (w, _, _) in VIT_SIZES.items():
        if w == width:
            return name
    return "vit_small"


def grid_side(n: int) -> int | None:
    """Side of a square grid of ``n`` cells, or None."""
    s = int(math.isqrt(n))
    return s if s * s == n else None
