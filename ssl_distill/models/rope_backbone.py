"""DINOv3's ViT (Siméoni et al. 2025, ``facebookresearch/dinov3``) as a backbone: timm's ``Eva`` with axial RoPE.

The architecture of the official ``DinoVisionTransformer``, built from timm's DINOv3 port (``Eva`` with
``rope_type="dinov3"``, the model behind ``timm.create_model("vit_*_patch16_dinov3_qkvb")``):

- no learned position embedding: position enters only through 2-D axial RoPE on the patch tokens'
  queries and keys (period base ``spec.rope_theta``, the official ``base``: 100; coordinates normalised
  per axis ("separate") to (-1, 1); rotate-half layout); prefix tokens ([CLS], [OBJ], registers) are not
  rotated;
- storage (register) tokens after [CLS] (``spec.reg_tokens``, 4 officially), LayerScale
  (``spec.layer_scale``, 1e-5), LayerNorm eps 1e-5 (``spec.norm_eps``), a GELU MLP or a SwiGLU one with
  separate gate and value projections (S+/16, H+/16; ``spec.mlp_ratio`` is both halves' width / D);
- the qkv bias with its K third held at zero (``mask_k_bias``): timm's ``q_bias`` / ``v_bias`` parameters
  and a zero ``k_bias`` buffer;
- the RoPE periods are a persistent buffer, ``vit.rope.periods`` (D_head / 4,): a model loaded from a
  released file computes with that file's periods (which may be bf16-rounded), and our checkpoints
  carry them; a fresh model holds the fp32 formula values ``base ** (4 i / D_head)``.

Sizes (``model.*`` keys; 64-wide heads): S/16 ``embed_dim 384, depth 12, num_heads 6, mlp_ratio 4``;
S+/16 ``384, 12, 6, mlp_layer swiglu, mlp_ratio 8``; B/16 ``768, 12, 12``; L/16 ``1024, 24, 16``;
H+/16 ``1280, 32, 20, swiglu, mlp_ratio 8``; every one with ``pos_embed rope, reg_tokens 4,
layer_scale 1e-5``.

Training (``init_weights=True``) follows the official ``init_weights``: class and storage tokens
normal(0.02), every Linear trunc_normal(0.02) with zero bias (no depth rescaling), LayerNorms at 1 / 0,
LayerScale at its init value, the patch embedding uniform(+-1/sqrt(3 p^2)), the mask token at zero. Drop
path has the same rate in every block, and the RoPE coordinate augmentation (``spec.rope_rescale_coords``:
both axes scaled by one log-uniform factor in [1/R, R], official R = 2; the student only, the teacher is
built without it) is drawn afresh for every block, both as officially. Kept from timm instead:

- drop path is timm's per-sample ``DropPath`` (each sample's residual branch zeroed with the rate, the
  rest scaled by 1 / (1 - rate)), not the official batch-subset trick (the branch computed on
  ``int(B (1 - rate))`` random samples only, scaled by B / subset): the same expectation, and timm's
  blocks stay as they are;
- the augmentation draws come from timm's ``RotaryEmbeddingDinoV3`` (the CPU generator), not from the
  periods' device as officially: the same distribution, another random stream;
- in mixed precision the RoPE sin / cos (computed in fp32) rotate the queries and keys in the autocast dtype,
  as the official training default (``pos_embed_rope_dtype: bf16``) does, not in the releases' fp32: on a
  CPU the fp32 rotation of bf16 queries and keys costs ~5% of a ViT-S/16 step (mixed-dtype elementwise
  ops). fp32 runs and evaluations rotate in fp32, as the releases.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, LayerNorm, RotaryEmbeddingDinoV3
from timm.models.eva import Eva
from torch import nn

from .backbone import BackboneSpec, TokenBackbone, timm_mlp_ratio

__all__ = ["DINOV3_NORM_EPS", "RopeViTBackbone", "dinov3_timm_args", "eva_kwargs", "rope_export"]

DINOV3_NORM_EPS = 1e-5  # the official "layernormbf16": an ordinary LayerNorm with eps 1e-5
# timm's DINOv3 model names by (width, SwiGLU): every dimension is passed explicitly besides
_TIMM_NAMES = {(384, False): "vit_small", (384, True): "vit_small_plus", (768, False): "vit_base",
               (1024, False): "vit_large", (1280, True): "vit_huge_plus", (4096, True): "vit_7b"}


def _dims(spec: BackboneSpec) -> tuple[int, int, int, int]:
    """(width, depth, heads, MLP hidden width per branch) of a RoPE spec, validated."""
    if spec.pos_embed != "rope":
        raise ValueError(f"a RoPE backbone needs pos_embed='rope', got {spec.pos_embed!r}")
    if spec.no_embed_class or spec.pos_interp != "timm":
        raise ValueError("no_embed_class and pos_interp describe a learned position embedding, which a RoPE "
                         "backbone has not: leave them at false / timm")
    if spec.mlp_layer not in ("mlp", "swiglu"):
        raise ValueError(f"mlp_layer must be mlp or swiglu, got {spec.mlp_layer!r}")
    width, depth, heads = spec.dims()
    if width % heads or (width // heads) % 4:
        raise ValueError(f"embed_dim {width} / num_heads {heads} must give a head width that is a multiple of 4 "
                         "(axial RoPE rotates quarter-head pairs per axis)")
    if spec.rope_theta <= 0:
        raise ValueError(f"rope_theta must be > 0, got {spec.rope_theta}")
    if spec.rope_rescale_coords is not None and spec.rope_rescale_coords < 1:
        raise ValueError(f"rope_rescale_coords must be >= 1 (a factor range [1/R, R]) or None, got "
                         f"{spec.rope_rescale_coords}")
    hidden = spec.mlp_hidden()
    if spec.mlp_layer == "swiglu":
        if hidden % 2:
            raise ValueError(f"a SwiGLU MLP of packed width {hidden} (mlp_ratio x embed_dim) cannot be split in "
                             "two equal halves")
        hidden //= 2
    return width, depth, heads, hidden


def _model_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    """The keyword arguments of timm's DINOv3 models that a spec sets (JSON values; no classifier)."""
    width, depth, heads, hidden = _dims(spec)
    swiglu = spec.mlp_layer == "swiglu"
    return dict(
        img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=width, depth=depth, num_heads=heads,
        qkv_bias=spec.qkv_bias, mlp_ratio=timm_mlp_ratio(hidden, width), swiglu_mlp=swiglu,
        # align 1: SwiGLU with separate gate / value projections (fc1_g, fc1_x) of exactly ``hidden``
        swiglu_align_to=1 if swiglu else 0, init_values=spec.layer_scale, num_reg_tokens=spec.reg_tokens,
        rope_temperature=spec.rope_theta, num_classes=0, global_pool="token",
    )


def eva_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    """Keyword arguments of timm's ``Eva`` for a RoPE spec: what timm's ``vit_*_patch16_dinov3`` functions fix
    (no drop path: set per block)."""
    eps = spec.norm_eps if spec.norm_eps is not None else DINOV3_NORM_EPS
    return dict(
        _model_kwargs(spec), use_fc_norm=False, use_abs_pos_emb=False, use_rot_pos_emb=True, rope_type="dinov3",
        rope_rotate_half=True, dynamic_img_size=True, norm_layer=partial(LayerNorm, eps=eps),
    )


def dinov3_timm_args(spec: BackboneSpec) -> tuple[str, dict[str, Any]]:
    """(timm model name, JSON keyword arguments) that build ``spec`` with ``timm.create_model``.

    The ``_qkvb`` variants where the model has a qkv bias (timm's plain DINOv3 names have none); every
    dimension is explicit, so any width and depth works under the nearest name. timm's DINOv3 models use
    LayerNorm eps 1e-5; another ``norm_eps`` needs ``norm_layer=partial(timm.layers.LayerNorm, eps=...)``
    besides these arguments (it has no JSON form).
    """
    size = _TIMM_NAMES.get((spec.dims()[0], spec.mlp_layer == "swiglu"),
                           "vit_small_plus" if spec.mlp_layer == "swiglu" else "vit_small")
    return f"{size}_patch16_dinov3{'_qkvb' if spec.qkv_bias and size != 'vit_7b' else ''}", _model_kwargs(spec)


def _timm_rope(spec: BackboneSpec) -> RotaryEmbeddingDinoV3:
    """timm's DINOv3 RoPE for ``spec``: its periods are the fp32 formula ``theta ** (4 i / D_head)``."""
    width, _, heads = spec.dims()
    return RotaryEmbeddingDinoV3(dim=width // heads, temperature=spec.rope_theta, rotate_half=True,
                                 rescale_coords=spec.rope_rescale_coords)


def rope_export(backbone: RopeViTBackbone, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What exporting a RoPE backbone to timm adds to the export's sidecar: its periods and a note on them.

    Removes ``rope.periods`` from ``state`` (the backbone's ``vit`` state dict): timm's model does not store
    them but computes the fp32 formula from ``rope_temperature``.
    """
    periods = state.pop("rope.periods")
    if torch.equal(periods, _timm_rope(backbone.spec).periods):
        note = "timm computes these RoPE periods itself (rope_temperature): the features match exactly"
    else:
        note = ("this model's RoPE periods are not the fp32 formula timm computes (a released file's are bf16-rounded):"
                " for the same features, copy them after loading: "
                "model.rope.periods.copy_(torch.tensor(info['rope_periods']))")
    return {"rope_periods": periods.tolist(), "note": note}


class RopeViTBackbone(TokenBackbone):
    """DINOv3's ViT on timm's ``Eva`` (see the module docstring); offers what :class:`ViTBackbone` offers.

    The mask token (``masked_embed`` (1, D), iBOT / DINOv3's ``mask_token``) replaces masked patch
    embeddings before the blocks, and RoPE still rotates them at their positions, as officially. The
    [OBJ] token (``obj_token`` (1, 1, D), no position term: RoPE leaves prefix tokens alone) sits after
    [CLS]; every block's RoPE prefix count includes it.
    """

    def __init__(self, spec: BackboneSpec, init_weights: bool = True, mask_token: bool = False,
                 obj_token: bool = False) -> None:
        """``init_weights=False`` leaves timm's initialisation (the weights are loaded right after).

        ``obj_token`` adds ODIS's [OBJ] token, initialised like the class token (normal, std 0.02), drawn
        after every other weight (a backbone without [OBJ] gets the same weights from one seed).
        """
        super().__init__()
        self.spec = spec
        kwargs = eva_kwargs(spec)
        self.vit = Eva(**kwargs)
        rope = _timm_rope(spec)
        # persistent: checkpoints carry the periods, and a released file's (bf16-rounded) values load
        rope.register_buffer("periods", rope.periods.detach().clone(), persistent=True)
        self.vit.rope = rope
        for blk in self.vit.blocks:  # the same drop-path rate in every block, as DINOv3
            blk.drop_path1 = DropPath(spec.drop_path_rate) if spec.drop_path_rate > 0 else nn.Identity()
            blk.drop_path2 = DropPath(spec.drop_path_rate) if spec.drop_path_rate > 0 else nn.Identity()
        self._set_sizes(kwargs["embed_dim"], kwargs["depth"], mask_token, obj_token)
        self.obj_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if obj_token else None
        if init_weights:
            self._init_weights()
            if self.obj_token is not None:
                nn.init.normal_(self.obj_token, std=0.02)
        self.num_prefix_tokens = self.vit.num_prefix_tokens + int(self.has_obj_token)
        for blk in self.vit.blocks:  # tokens RoPE leaves alone
            blk.attn.num_prefix_tokens = self.num_prefix_tokens

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The official ``DinoVisionTransformer.init_weights`` (see the module docstring)."""
        v = self.vit
        nn.init.normal_(v.cls_token, std=0.02)
        if v.reg_token is not None:
            nn.init.normal_(v.reg_token, std=0.02)
        for m in v.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        for blk in v.blocks:
            if blk.attn.q_bias is not None:
                nn.init.zeros_(blk.attn.q_bias)
                nn.init.zeros_(blk.attn.v_bias)
            for gamma in (blk.gamma_1, blk.gamma_2):
                if gamma is not None:
                    nn.init.constant_(gamma, self.spec.layer_scale)
        proj = v.patch_embed.proj
        bound = (1 / (proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1])) ** 0.5
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.uniform_(proj.bias, -bound, bound)

    @torch.no_grad()
    def init_obj_from_cls(self) -> None:
        """Set ``obj_token`` to the class token: ODIS starting from a backbone without [OBJ]."""
        if self.obj_token is None:
            raise ValueError("init_obj_from_cls needs a backbone built with obj_token=True")
        self.obj_token.copy_(self.vit.cls_token)

    def fill_obj(self, state: dict[str, torch.Tensor]) -> bool:
        """Add ``obj_token`` (from ``vit.cls_token``) to a state dict of this backbone that lacks it."""
        if "obj_token" in state:
            return False
        if "vit.cls_token" not in state:
            raise ValueError("no vit.cls_token to initialise the [OBJ] token from")
        state["obj_token"] = state["vit.cls_token"].detach().clone().reshape(1, 1, -1)
        return True

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None = None, obj_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        v = self.vit
        h = self._mask_patches(v.patch_embed(x), mask)  # (B, H/p, W/p, D)
        b, gh, gw, d = h.shape
        prefix = [v.cls_token.expand(b, -1, -1)]
        if v.reg_token is not None:
            prefix.append(v.reg_token.expand(b, -1, -1))
        h = torch.cat([*prefix, h.reshape(b, gh * gw, d)], dim=1)  # [CLS, registers..., patches]
        h, attn_mask = self._insert_obj(h, self.obj_token, obj_mask, gh * gw)
        return h, attn_mask, (gh, gw)

    def _block_kwargs(self, grid: tuple[int, int], n: int, dtype: torch.dtype) -> list[dict[str, Any]]:
        """Each block's RoPE embedding (P, 2 head_dim): one per forward, or a fresh augmentation draw per
        block while training with ``rope_rescale_coords``; in ``dtype`` (see the module docstring)."""
        rope = self.vit.rope
        if rope.training and rope.aug_active:
            return [{"rope": rope.get_embed(shape=list(grid)).to(dtype)} for _ in range(n)]
        return [{"rope": rope.get_embed(shape=list(grid)).to(dtype)}] * n
