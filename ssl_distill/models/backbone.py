"""ViT backbone: a thin wrapper over timm's ``VisionTransformer``, and what every backbone wrapper offers.

The wrapper adds what self-distillation needs and timm does not name directly: the CLS and patch
tokens as named outputs, the normalized tokens of the last ``n`` blocks (DINO's
``get_intermediate_layers``), any input resolution (position embeddings interpolated), and a switch
between the fused attention kernel and the plain matmul-softmax path (on CPU the plain path's
backward is about 2x faster, measured here). :class:`TokenBackbone` holds what does not depend on how
positions enter (named outputs, mask token, [OBJ] token and its attention mask, last-block CLS attention,
intermediate layers); :class:`ViTBackbone` is the learned-position ViT on it, and
:class:`ssl_distill.models.rope_backbone.RopeViTBackbone` DINOv3's RoPE ViT. :class:`BackboneSpec`
describes both (``pos_embed``).

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

ODIS's [OBJ] token (Hızlı, Yıldız, Marttinen 2025, "Object-level Self-Distillation for Vision
Pretraining", arXiv 2506.05409; what we could read of it: the abstract and introduction, the ICLR 2026
submission's abstract, the co-author's project page cagatayyildiz.github.io/projects/odis with its
attention code, and ``KarahanS/Cross-Time-Self-Distillation``, which builds on ODIS), with ``obj_token=True``:

- layout ``[CLS, OBJ, registers..., patches]``; the [OBJ] token is the learned ``obj_token`` plus its own
  learned position term ``obj_pos_embed`` (both (1, 1, D)), inserted after timm's position embedding (the
  derivative code gives [OBJ] its own learned position entry after [CLS]'s);
- at every block the [OBJ] query attends only to itself and the patches inside its view's object mask
  (project page: "the [OBJ] token can only attend to object patches", the mask applied at every layer),
  never to registers; :class:`ObjAttention` says whether it also reads [CLS] and whether the other
  queries read the [OBJ] key (the project page masks "only the [OBJ] row": they do, the default);
- one additive attention mask (0 / -inf, (B, 1, T, T)) per forward, built once and given to every
  block (``Block(x, attn_mask=...)``): the fused SDPA kernel and timm's matmul-softmax path both add it
  to the logits before the softmax, so masked keys get exactly zero weight.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked, apply_rot_embed_cat
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..config import Config, ModelConfig

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
OBJ_KEYS = ("obj_token", "obj_pos_embed")  # the [OBJ] parameters of ViTBackbone (outside ``vit``)


@dataclass(frozen=True)
class ObjAttention:
    """Who reads whom around ODIS's [OBJ] token (``odis.patches_read_obj`` / ``odis.obj_reads_cls``).

    The [OBJ] query always reads itself and its object's patches, never a register. ``patches_read_obj``
    False with ``obj_reads_cls`` True is our earlier reading, where the [CLS] and patch outputs equal those
    of the same weights without [OBJ]; :meth:`from_config` gives that pattern to configs that predate the keys.
    """

    patches_read_obj: bool = True  # [CLS], registers, patches read [OBJ]: the project page masks the [OBJ] row only
    obj_reads_cls: bool = False  # project page: [OBJ] reads object patches only (the derivative code: also [CLS])

    @classmethod
    def from_config(cls, cfg: Config, keys: dict[str, Any] | None = None) -> ObjAttention:
        """The pattern of ``cfg.odis`` for a model whose [OBJ] token that config trains. A config with no object
        term (``odis.weight`` 0) gets [OBJ] as a pure read-out that no other query reads; ``keys``, a
        checkpoint's stored ``odis`` section, without the two keys: the pattern every run had before they
        existed (no query reads [OBJ], [OBJ] reads [CLS])."""
        if keys is not None and "patches_read_obj" not in keys:
            return cls(patches_read_obj=False, obj_reads_cls=True)
        return cls(cfg.odis.patches_read_obj and cfg.odis.weight > 0, cfg.odis.obj_reads_cls)


def timm_mlp_ratio(hidden: int, width: int) -> float:
    """timm's ``mlp_ratio`` for an MLP hidden width: timm computes ``int(width * mlp_ratio)``, so the ratio is
    nudged where float rounding would lose a unit."""
    return hidden / width if int(width * (hidden / width)) == hidden else (hidden + 0.5) / width


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
    # position encoding: "learned" (ViTBackbone, this module) | "rope" (DINOv3: models/rope_backbone.py)
    pos_embed: str = "learned"
    rope_theta: float = 100.0  # RoPE period base (rope only; DINOv3: pos_embed_rope_base, timm: rope_temperature)
    rope_rescale_coords: float | None = None  # RoPE coordinate rescaling while training (rope only; None: off)
    norm_eps: float | None = None  # LayerNorm eps (rope only); None: DINOv3's 1e-5 (learned: timm's 1e-6)

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
        kwargs: dict[str, Any] = dict(
            img_size=self.img_size, patch_size=self.patch_size, num_classes=0, embed_dim=width, depth=depth,
            num_heads=heads, mlp_ratio=timm_mlp_ratio(self.mlp_hidden(), width), qkv_bias=self.qkv_bias,
            drop_path_rate=self.drop_path_rate,
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


# the config's model section and BackboneSpec share these fields
_SPEC_FIELDS = ("arch", "patch_size", "img_size", "depth", "embed_dim", "num_heads", "mlp_ratio", "mlp_layer",
                "qkv_bias", "layer_scale", "reg_tokens", "no_embed_class", "pos_interp", "pos_embed", "rope_theta",
                "norm_eps")


def spec_from_config(cfg: Config, drop_path_rate: float = 0.0,
                     rope_rescale_coords: float | None = None) -> BackboneSpec:
    """The backbone described by a config's model section (evaluation and teacher: no drop-path, no RoPE
    coordinate augmentation; the student passes the config's values)."""
    m = cfg.model
    return BackboneSpec(**{f: getattr(m, f) for f in _SPEC_FIELDS}, drop_path_rate=drop_path_rate,
                        rope_rescale_coords=rope_rescale_coords)


def config_from_spec(spec: BackboneSpec) -> Config:
    """A default Config whose model section describes ``spec`` (dimensions explicit)."""
    width, depth, heads = spec.dims()
    values = {f: getattr(spec, f) for f in _SPEC_FIELDS}
    values.update(embed_dim=width, depth=depth, num_heads=heads, drop_path_rate=0.0)
    return Config(model=ModelConfig(**values))


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


def obj_init_from_cls(cls_token: torch.Tensor, pos_embed: torch.Tensor | None,
                      no_embed_class: bool) -> dict[str, torch.Tensor]:
    """``obj_token`` and ``obj_pos_embed`` (each (1, 1, D)) copied from a ViT's class token.

    The [OBJ] token starts as [CLS] and its position term as [CLS]'s (``pos_embed[:, :1]``); models whose
    position embedding covers the patches only (``no_embed_class``: the class token carries its own
    position) give a zero position term. Used to start ODIS from a DINO / iBOT checkpoint.
    """
    token = cls_token.detach().clone().reshape(1, 1, -1)
    if no_embed_class or pos_embed is None:
        pos = torch.zeros_like(token)
    else:
        pos = pos_embed.detach()[:, :1].clone()
    return {"obj_token": token, "obj_pos_embed": pos}


def fill_obj_from_cls(state: dict[str, torch.Tensor], no_embed_class: bool, prefix: str = "") -> bool:
    """Add ``{prefix}obj_token`` / ``{prefix}obj_pos_embed`` to a ViTBackbone state dict that lacks them.

    Taken from ``{prefix}vit.cls_token`` / ``{prefix}vit.pos_embed`` (:func:`obj_init_from_cls`), so a
    checkpoint of a backbone without [OBJ] loads strictly into one with it. Returns whether it added them;
    a state holding only one of the two raises ValueError.
    """
    present = [k for k in OBJ_KEYS if prefix + k in state]
    if len(present) == len(OBJ_KEYS):
        return False
    if present:
        missing = next(prefix + k for k in OBJ_KEYS if k not in present)
        raise ValueError(f"state dict has {prefix + present[0]} but no {missing}: an [OBJ] token needs both")
    if prefix + "vit.cls_token" not in state:
        raise ValueError(f"no {prefix}vit.cls_token to initialise the [OBJ] token from")
    init = obj_init_from_cls(state[prefix + "vit.cls_token"], state.get(prefix + "vit.pos_embed"), no_embed_class)
    state.update({prefix + k: v for k, v in init.items()})
    return True


def _attention_dtype(h: torch.Tensor) -> torch.dtype:
    """dtype of the attention logits the blocks will compute from ``h`` (autocast's when it is on)."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype


def fused_qkv_bias(attn: nn.Module) -> torch.Tensor | None:
    """The bias of an attention module's fused ``qkv`` projection, (3 D,) or None.

    timm's ``Attention`` keeps it in ``qkv.bias``; its ``EvaAttention`` (DINOv3) in ``q_bias``, a zero
    ``k_bias`` buffer and ``v_bias``, concatenated in its forward as here.
    """
    if attn.qkv.bias is not None:
        return attn.qkv.bias
    q_bias = getattr(attn, "q_bias", None)
    return None if q_bias is None else torch.cat((q_bias, attn.k_bias, attn.v_bias))


def rotate_patches(t: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool = True) -> torch.Tensor:
    """RoPE on the patch tokens of queries or keys (B, heads, N, head_dim), as timm's ``EvaAttention``:
    ``rope`` (P, 2 head_dim) is [sin | cos], in the rotate-half layout (DINOv3) or the interleaved one;
    the prefix tokens are not rotated."""
    rotated = apply_rot_embed_cat(t[:, :, num_prefix_tokens:], rope, half=half)
    return torch.cat([t[:, :, :num_prefix_tokens], rotated], dim=2).type_as(t)


class TokenBackbone(nn.Module):
    """What every backbone wrapper offers on its timm model ``vit``: named tokens for batches of same-size crops.

    ``forward(x)`` with ``x`` of shape (B, 3, H, W), H and W multiples of the patch size, returns the
    CLS token after the final norm, shape (B, D). :meth:`forward_tokens` also returns the patch tokens
    (and the register tokens when the model has some, the [OBJ] token when it has one);
    :meth:`get_intermediate_layers` the tokens of the last ``n`` blocks.

    With an [OBJ] token (ODIS, see the module docstring) the token sequence is
    ``[CLS, OBJ, registers..., patches]`` and ``num_prefix_tokens`` counts the [OBJ] token;
    ``obj_attention`` (:class:`ObjAttention`) says which queries read the [OBJ] key and whether [OBJ]
    reads [CLS].

    A subclass builds ``vit`` and the attributes below, and says how tokens enter the blocks
    (:meth:`_embed`) and what else each block call takes (:meth:`_block_kwargs`).
    """

    vit: nn.Module
    spec: BackboneSpec
    embed_dim: int
    depth: int
    patch_size: int
    num_reg_tokens: int
    num_prefix_tokens: int  # tokens before the patches in the sequences of forward_tokens
    has_obj_token: bool
    masked_embed: nn.Parameter | None
    obj_token: nn.Parameter | None
    obj_attention: ObjAttention = ObjAttention()

    def _set_sizes(self, embed_dim: int, depth: int, mask_token: bool, obj_token: bool) -> None:
        """The sizes of a backbone just built on ``self.spec``, and its mask token (zeros, (1, D)) if asked."""
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = self.spec.patch_size
        self.num_reg_tokens = self.spec.reg_tokens
        self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        self.has_obj_token = bool(obj_token)

    def set_fused_attn(self, fused: bool) -> None:
        """Choose the fused SDPA kernel (fast on CUDA) or the plain matmul-softmax path (fast on CPU)."""
        for blk in self.vit.blocks:
            blk.attn.fused_attn = fused

    def fit_pos_embed(self, state: dict[str, torch.Tensor]) -> str | None:
        """Resample a file's position embedding to this backbone (see :class:`ViTBackbone`); None: nothing to do."""
        return None

    def _split(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens :]}
        first_reg = 1 + int(self.has_obj_token)
        if self.has_obj_token:
            out["obj"] = tokens[:, 1]
        if self.num_reg_tokens:
            out["reg"] = tokens[:, first_reg : self.num_prefix_tokens]
        return out

    def obj_attention_mask(self, obj_mask: torch.Tensor | None, batch: int, num_patches: int,
                           dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The additive attention mask of an [OBJ] backbone: (B, 1, T, T), or (1, 1, T, T) when ``obj_mask``
        is None; 0 where query i may attend to key j, -inf where not. T = num_prefix_tokens + num_patches.

        Row 1 (the [OBJ] query) allows [OBJ], the patches where ``obj_mask`` (B, P) is True and, with
        ``obj_attention.obj_reads_cls``, [CLS]; column 1 (the [OBJ] key) is open to every other query with
        ``obj_attention.patches_read_obj``, closed otherwise. Every row keeps a finite entry (the [OBJ] row
        always sees itself), so an all-False ``obj_mask`` still gives finite outputs. On CUDA the rows are
        allocated 16-aligned (then sliced to T) so the memory-efficient SDPA kernel takes the mask as it is
        instead of padding a copy at every block.
        """
        t = self.num_prefix_tokens + num_patches
        n = 1 if obj_mask is None else batch
        width = -(-t // 16) * 16 if device.type == "cuda" else t
        mask = torch.zeros(n, 1, t, width, dtype=dtype, device=device)[..., :t]
        neg = float("-inf")
        if not self.obj_attention.patches_read_obj:
            mask[:, :, :, 1] = neg  # no query reads [OBJ] ...
        if not self.obj_attention.obj_reads_cls:
            mask[:, :, 1, 0] = neg  # ... [OBJ] reads no [CLS] ...
        mask[:, :, 1, 2 : self.num_prefix_tokens] = neg  # ... no register ...
        if obj_mask is not None:  # ... nor a patch outside its object
            mask[:, 0, 1, self.num_prefix_tokens :].masked_fill_(~obj_mask, neg)
        mask[:, :, 1, 1] = 0.0  # ... but itself
        return mask

    def _mask_patches(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Patch embeddings (B, H/p, W/p, D), those where ``mask`` (B, P) is True replaced by ``masked_embed``."""
        if mask is None:
            return h
        if self.masked_embed is None:
            raise ValueError("a patch mask needs a backbone built with mask_token=True")
        return torch.where(mask.view(*h.shape[:-1], 1), self.masked_embed.to(h.dtype), h)

    def _insert_obj(self, h: torch.Tensor, obj: torch.Tensor | None, obj_mask: torch.Tensor | None,
                    num_patches: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[CLS, rest...] (B, T, D) -> [CLS, OBJ, rest...] and its attention mask, for an [OBJ] backbone
        (``obj`` (1, 1, D): the [OBJ] token's input); the sequence unchanged and no mask otherwise."""
        b = h.shape[0]
        if obj is None:
            if obj_mask is not None:
                raise ValueError("an object mask needs a backbone built with obj_token=True")
            return h, None
        if obj_mask is not None and (obj_mask.dtype != torch.bool or tuple(obj_mask.shape) != (b, num_patches)):
            raise ValueError(f"obj_mask must be a bool tensor of shape {(b, num_patches)} (images, patches), "
                             f"got {obj_mask.dtype} {tuple(obj_mask.shape)}")
        h = torch.cat([h[:, :1], obj.to(h.dtype).expand(b, -1, -1), h[:, 1:]], dim=1)
        return h, self.obj_attention_mask(obj_mask, b, num_patches, _attention_dtype(h), h.device)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None = None, obj_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """(B, 3, H, W) -> the blocks' input (B, T, D), their attention mask (None without [OBJ]) and the
        patch grid (H/p, W/p)."""
        raise NotImplementedError

    def _block_kwargs(self, grid: tuple[int, int], n: int, dtype: torch.dtype) -> list[dict[str, Any]]:
        """Keyword arguments of the next ``n`` block calls beside ``attn_mask`` (one dict per block), for a
        patch grid ``grid`` and attention computed in ``dtype``."""
        return [{} for _ in range(n)]

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       cls_attention: bool = False, obj_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"cls": (B, D), "patch": (B, P, D)}, both after the final norm; P = H/p * W/p.

        Models with register tokens also return ``"reg"``: (B, R, D); models with an [OBJ] token
        ``"obj"``: (B, D), after the final norm.

        Args:
            mask: (B, P) bool, True where the patch embedding is replaced by ``masked_embed`` before
                any position information enters (iBOT, Zhou et al. 2022, Sec. 3.2); needs ``mask_token``.
            cls_attention: also return ``"cls_attention"`` (B, P): the last block's attention of the
                CLS query over the patches, averaged over heads (AttMask, Kakogeorgiou et al. 2022,
                Sec. 3.2), from this same forward. Only the CLS row is computed: one extra key
                projection of the last block's input, no attention matrix is kept. With [OBJ] it is
                the softmax over the keys CLS attends to (the [OBJ] key among them where CLS reads it).
            obj_mask: (B, P) bool, True for the patches inside the object the [OBJ] token may attend to
                (ODIS); None: every patch. Needs ``obj_token``.
        """
        blocks = self.vit.blocks
        h, attn_mask, grid = self._embed(x, mask, obj_mask)
        extra = self._block_kwargs(grid, len(blocks), _attention_dtype(h))
        for blk, kwargs in zip(blocks[:-1], extra[:-1]):
            h = blk(h, attn_mask=attn_mask, **kwargs)
        attention = self._cls_attention(blocks[-1], h, **extra[-1]) if cls_attention else None
        out = self._split(self.vit.norm(blocks[-1](h, attn_mask=attn_mask, **extra[-1])))
        if attention is not None:
            out["cls_attention"] = attention
        return out

    def _cls_attention(self, block: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) input of ``block`` -> (B, P) its CLS -> patch attention, mean over heads (the keys
        rotated by ``rope`` (P, 2 head_dim) where the block takes one; CLS, a prefix token, is not)."""
        attn = block.attn
        x = block.norm1(h)
        w, b = attn.qkv.weight, fused_qkv_bias(attn)
        d = w.shape[0] // 3
        q = F.linear(x[:, :1], w[:d], None if b is None else b[:d])  # (B, 1, D) the CLS query only
        k = F.linear(x, w[d : 2 * d], None if b is None else b[d : 2 * d])  # (B, T, D)
        bsz, t, _ = x.shape
        q = attn.q_norm(q.view(bsz, 1, attn.num_heads, -1).transpose(1, 2))
        k = attn.k_norm(k.view(bsz, t, attn.num_heads, -1).transpose(1, 2))
        if rope is not None:
            k = rotate_patches(k, rope, self.num_prefix_tokens)
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, T)
        prefix = self.num_prefix_tokens
        if self.has_obj_token and not self.obj_attention.patches_read_obj:  # CLS does not read [OBJ] (key 1)
            logits = torch.cat([logits[..., :1], logits[..., 2:]], dim=-1)
            prefix -= 1
        weights = logits.float().softmax(dim=-1)
        return weights[:, :, 0, prefix:].mean(dim=1)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1, norm: bool = True,
                                obj_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Token sequences (B, T, D) output by the last ``n`` blocks, oldest first (DINO's method).

        ``T = num_prefix_tokens + patches`` ([CLS, registers..., patches]; with [OBJ]: [CLS, OBJ,
        registers..., patches], the [OBJ] token attending to the patches of ``obj_mask`` (B, P), or to
        every patch when it is None); with ``norm`` each output goes through the final LayerNorm, as DINO
        and DINOv2 do for linear evaluation (and DINOv3 for its untied-norm-free releases).
        """
        if not 1 <= n <= self.depth:
            raise ValueError(f"n must be in [1, {self.depth}], got {n}")
        h, attn_mask, grid = self._embed(x, obj_mask=obj_mask)
        extra = self._block_kwargs(grid, self.depth, _attention_dtype(h))
        outputs = []
        for i, (blk, kwargs) in enumerate(zip(self.vit.blocks, extra)):
            h = blk(h, attn_mask=attn_mask, **kwargs)
            if i >= self.depth - n:
                outputs.append(self.vit.norm(h) if norm else h)
        return outputs

    def forward_last_blocks(self, x: torch.Tensor, n: int = 1,
                            obj_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"cls": (B, n, D) CLS of the last n blocks (oldest first), "patch": (B, P, D) last block's patches}.

        Everything after the final norm; registers are excluded from ``patch``. With [OBJ] also
        ``"obj"``: (B, n, D), the [OBJ] token of the last n blocks (attending to ``obj_mask``'s patches).
        """
        outs = self.get_intermediate_layers(x, n, obj_mask=obj_mask)
        out = {"cls": torch.stack([o[:, 0] for o in outs], dim=1), "patch": outs[-1][:, self.num_prefix_tokens :]}
        if self.has_obj_token:
            out["obj"] = torch.stack([o[:, 1] for o in outs], dim=1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> CLS features (B, D)."""
        return self.forward_tokens(x)["cls"]


class ViTBackbone(TokenBackbone):
    """The learned-position ViT (timm's ``VisionTransformer``): DINO, iBOT, DINOv2 and ODIS models.

    See :class:`TokenBackbone` for what it returns; the variants it builds are in the module docstring.
    """

    def __init__(self, spec: BackboneSpec, init_weights: bool = True, mask_token: bool = False,
                 obj_token: bool = False) -> None:
        """``init_weights=False`` skips the random initialisation (the weights are loaded right after).

        ``mask_token`` adds iBOT's learned ``masked_embed`` (1, D), zero-initialised as iBOT, which
        replaces the patch embeddings of masked positions (see :meth:`forward_tokens`).

        ``obj_token`` adds ODIS's [OBJ] token: ``obj_token`` (1, 1, D) initialised like DINO's class token
        and ``obj_pos_embed`` (1, 1, D) like DINO's position embedding (both trunc normal, std 0.02),
        drawn after every other weight (a backbone without [OBJ] gets the same weights from one seed).
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
        self._set_sizes(kwargs["embed_dim"], kwargs["depth"], mask_token, obj_token)
        self.obj_token = None
        self.obj_pos_embed: nn.Parameter | None = None
        if obj_token:
            self.obj_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            self.obj_pos_embed = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            if init_weights:
                nn.init.trunc_normal_(self.obj_token, std=0.02)
                nn.init.trunc_normal_(self.obj_pos_embed, std=0.02)
        self.num_prefix_tokens = self.vit.num_prefix_tokens + int(self.has_obj_token)

    def fit_pos_embed(self, state: dict[str, torch.Tensor]) -> str | None:
        """Resample ``state["vit.pos_embed"]`` in place to this backbone's stored grid, when the file was
        trained at another image size / patch grid (square grids, same prefix tokens and width).

        Bicubic, as this backbone interpolates at other input sizes (``spec.pos_interp``: timm's
        antialiased resampling, or DINO's scale factor ``(grid + 0.1) / stored``), so a backbone
        started from the file computes what the file's own model computes at this run's size. Returns a
        sentence saying what was done, or None when nothing needed resampling.
        """
        pos, ours = state.get("vit.pos_embed"), self.vit.pos_embed
        if pos is None or ours is None or pos.shape == ours.shape or pos.shape[-1] != ours.shape[-1]:
            return None
        prefix = 0 if self.vit.no_embed_class else self.vit.num_prefix_tokens
        old_side, new_grid = grid_side(pos.shape[1] - prefix), tuple(self.vit.patch_embed.grid_size)
        if old_side is None or pos.shape[1] <= prefix:
            return None  # not a square grid with our prefix: the strict load names the mismatch
        old_grid = (old_side, old_side)
        if self.spec.pos_interp == "dino":
            state["vit.pos_embed"] = resample_pos_embed_dino(pos, new_grid, old_grid, prefix)
        else:
            from timm.layers import resample_abs_pos_embed

            state["vit.pos_embed"] = resample_abs_pos_embed(pos, list(new_grid), list(old_grid),
                                                            num_prefix_tokens=prefix)
        return (f"vit.pos_embed resampled from a {old_grid[0]}x{old_grid[1]} to a {new_grid[0]}x{new_grid[1]} "
                f"patch grid ({self.spec.pos_interp} interpolation)")

    @torch.no_grad()
    def init_obj_from_cls(self) -> None:
        """Set ``obj_token`` to the class token and ``obj_pos_embed`` to its position term (see
        :func:`obj_init_from_cls`): ODIS starting from a DINO / iBOT backbone."""
        if self.obj_token is None or self.obj_pos_embed is None:
            raise ValueError("init_obj_from_cls needs a backbone built with obj_token=True")
        init = obj_init_from_cls(self.vit.cls_token, self.vit.pos_embed, self.vit.no_embed_class)
        self.obj_token.copy_(init["obj_token"])
        self.obj_pos_embed.copy_(init["obj_pos_embed"])

    def fill_obj(self, state: dict[str, torch.Tensor]) -> bool:
        """Add the [OBJ] parameters to a state dict of this backbone that lacks them (:func:`fill_obj_from_cls`)."""
        return fill_obj_from_cls(state, self.vit.no_embed_class)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None = None, obj_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        v = self.vit
        h = self._mask_patches(v.patch_embed(x), mask)  # (B, H/p, W/p, D): dynamic image size keeps the grid
        grid = (h.shape[1], h.shape[2])
        h = v._pos_embed(h)  # (B, 1 + R + P, D)
        obj = None if self.obj_token is None else self.obj_token + self.obj_pos_embed
        h, attn_mask = self._insert_obj(h, obj, obj_mask, grid[0] * grid[1])
        return v.norm_pre(v.patch_drop(h)), attn_mask, grid

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       cls_attention: bool = False, obj_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :meth:`TokenBackbone.forward_tokens`; without masks, [OBJ] or attention it is timm's own forward."""
        if mask is None and not cls_attention and self.obj_token is None and obj_mask is None:
            return self._split(self.vit.forward_features(x))
        return super().forward_tokens(x, mask, cls_attention, obj_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> CLS features (B, D).

        With an [OBJ] token that CLS does not read (``obj_attention.patches_read_obj`` False) the token is
        left out of this forward: the CLS output is that of :meth:`forward_tokens` (up to float rounding) at
        the cost of the plain ViT.
        """
        if self.has_obj_token and self.obj_attention.patches_read_obj:
            return self.forward_tokens(x)["cls"]
        return self.vit.forward_features(x)[:, 0]


def random_init_like(backbone: TokenBackbone, seed: int) -> TokenBackbone:
    """The same architecture as ``backbone`` ([OBJ] token included) with fresh weights drawn after
    ``torch.manual_seed(seed)``: frozen, in eval mode (the ``--random-init`` baseline of an evaluation)."""
    torch.manual_seed(seed)
    kwargs = {"obj_token": True} if getattr(backbone, "has_obj_token", False) else {}
    fresh = type(backbone)(copy.deepcopy(backbone.spec), **kwargs)
    fresh.obj_attention = backbone.obj_attention
    for prm in fresh.parameters():
        prm.requires_grad = False
    return fresh.eval()


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
