"""A reference DINOv3 ViT for the tests: the official ``DinoVisionTransformer``'s architecture and parameter names.

Written for these tests from a reading of ``facebookresearch/dinov3`` (``dinov3/models/vision_transformer.py``,
``dinov3/layers/``: attention with the masked K bias, RoPE, blocks, SwiGLU, LayerScale); it shares no code with
``ssl_distill``. Its ``state_dict()`` is the released layout (``cls_token``, ``storage_tokens``, ``mask_token``,
``rope_embed.periods``, ``blocks.N.attn.qkv.bias_mask``, ``ls1.gamma``, ``mlp.w1/w2/w3`` ...), so saving it gives
an official file. What the official model does not expose, the last block's CLS attention, is computed by hand
from the last block's input (the official forward has no attention-weights output).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RopeEmbed(nn.Module):
    """Axial RoPE of the official ``RopePositionEmbedding`` ("separate" coordinates, base form, no augmentation)."""

    def __init__(self, head_dim: int, base: float = 100.0) -> None:
        super().__init__()
        quarter = head_dim // 4
        self.register_buffer("periods", base ** (2 * torch.arange(quarter, dtype=torch.float32) / (head_dim // 2)))

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        rows = torch.arange(0.5, h, dtype=torch.float32) / h
        cols = torch.arange(0.5, w, dtype=torch.float32) / w
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0  # (HW, 2)
        angles = (2 * math.pi * coords[:, :, None] / self.periods[None, None, :].float()).flatten(1, 2)
        angles = angles.tile(2)  # (HW, D_head): [row, column] angles, twice (rotate-half pairs j and j + D/2)
        return angles.sin(), angles.cos()


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class KMaskedQKV(nn.Linear):
    """``LinearKMaskedBias``: the bias is multiplied by ``bias_mask`` (zero over the K third) in every forward."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 3 * dim, bias=True)
        mask = torch.ones(3 * dim)
        mask[dim : 2 * dim] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = KMaskedQKV(dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, heads, N, D_head), RoPE applied to q and k of the last HW tokens."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        sin, cos = rope
        prefix = n - sin.shape[0]
        q, k = (torch.cat([t[:, :, :prefix], t[:, :, prefix:] * cos + rotate_half(t[:, :, prefix:]) * sin], dim=2)
                for t in (q, k))
        return q, k, v

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self.qkv_heads(x, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """The official SwiGLU: hidden = int(ffn_hidden * 2 / 3) rounded up to a multiple of 8."""

    def __init__(self, dim: int, ffn_hidden: int) -> None:
        super().__init__()
        d = int(ffn_hidden * 2 / 3)
        d += -d % 8
        self.w1, self.w2, self.w3 = nn.Linear(dim, d), nn.Linear(dim, d), nn.Linear(d, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_ratio: float, swiglu: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * ffn_ratio)
        self.mlp = SwiGLUFFN(dim, hidden) if swiglu else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV3ViT(nn.Module):
    """The official DINOv3 ViT (patch 16 in every release), 4 storage tokens, masked K bias, LayerScale,
    LayerNorm eps 1e-5."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, ffn_ratio: float = 4.0, swiglu: bool = False,
                 storage: int = 4, local_cls_norm: bool = False, patch: int = 16) -> None:
        super().__init__()
        self.heads, self.storage = heads, storage
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, storage, dim))
        self.rope_embed = RopeEmbed(dim // heads)
        self.blocks = nn.ModuleList([Block(dim, heads, ffn_ratio, swiglu) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        if local_cls_norm:  # the SAT ViT-L / 7B files: used on local crops while training only
            self.local_cls_norm = nn.LayerNorm(dim, eps=1e-5)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def prepare(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        t = self.patch_embed.proj(x)  # (B, D, H, W)
        b, d, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)
        if masks is not None:
            t = torch.where(masks[..., None], self.mask_token[None].to(t.dtype), t)
        prefix = [self.cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1)]
        return torch.cat([*prefix, t], dim=1), (h, w)

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        t, (h, w) = self.prepare(x, masks)
        for blk in self.blocks:
            t = blk(t, self.rope_embed(h, w))
        n = self.norm(t)
        return {"x_norm_clstoken": n[:, 0], "x_storage_tokens": n[:, 1 : 1 + self.storage],
                "x_norm_patchtokens": n[:, 1 + self.storage :], "x_prenorm": t}

    def get_intermediate_layers(self, x: Tensor, n: int) -> list[Tensor]:
        """The last ``n`` blocks' outputs through ``norm``, all tokens (B, 1 + R + HW, D)."""
        t, (h, w) = self.prepare(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = blk(t, self.rope_embed(h, w))
            if i >= len(self.blocks) - n:
                outs.append(self.norm(t))
        return outs

    def last_cls_attention(self, x: Tensor) -> Tensor:
        """(B, HW): the last block's CLS -> patch attention weights (softmax over all keys), mean over heads."""
        t, (h, w) = self.prepare(x)
        for blk in self.blocks[:-1]:
            t = blk(t, self.rope_embed(h, w))
        last = self.blocks[-1]
        q, k, _ = last.attn.qkv_heads(last.norm1(t), self.rope_embed(h, w))
        weights = (q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (B, heads, 1, N)
        return weights[:, :, 0, 1 + self.storage :].mean(1)


    def attentions(self, x: Tensor) -> list[Tensor]:
        """Every block's attention weights (B, heads, N, N), softmax over all keys, in block order."""
        t, (h, w) = self.prepare(x)
        maps = []
        for blk in self.blocks:
            q, k, _ = blk.attn.qkv_heads(blk.norm1(t), self.rope_embed(h, w))
            maps.append((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1))
            t = blk(t, self.rope_embed(h, w))
        return maps

    def last_content_keys(self, x: Tensor) -> Tensor:
        """(B, HW, D): the last block's patch keys before RoPE (the K third of ``qkv`` with its masked bias),
        heads concatenated."""
        t, (h, w) = self.prepare(x)
        for blk in self.blocks[:-1]:
            t = blk(t, self.rope_embed(h, w))
        last = self.blocks[-1]
        k = last.attn.qkv(last.norm1(t)).chunk(3, dim=-1)[1]  # (B, N, D), heads side by side
        return k[:, 1 + self.storage :]


def random_dinov3(seed: int, dim: int = 384, depth: int = 12, heads: int = 6, ffn_ratio: float = 4.0,
                  swiglu: bool = False, bf16_periods: bool = False, local_cls_norm: bool = False,
                  patch: int = 16) -> DinoV3ViT:
    """A reference model at random, non-trivial weights (every parameter drawn, the K third of each qkv bias
    included; LayerScale around 0.3 so that every block matters), in eval mode. ``bf16_periods``: the periods
    rounded to bfloat16, as the released files are said to hold them (timm's note)."""
    model = DinoV3ViT(dim, depth, heads, ffn_ratio, swiglu, local_cls_norm=local_cls_norm, patch=patch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.3 + 0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name in ("cls_token", "storage_tokens", "mask_token"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 50
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        if bf16_periods:
            model.rope_embed.periods.copy_(model.rope_embed.periods.bfloat16().float())
    return model.eval()
