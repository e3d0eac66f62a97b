"""Looking inside a ViT on demand: last-block q/k/v and attention weights, rollout, patch tokens.

Nothing here changes the model or its normal forward: the blocks keep running their own code
(the fused attention kernel stays fused). While one of these functions runs, a forward *pre*-hook
on each requested block's attention module (``blk.attn``) receives that module's input (the
block's ``norm1`` output) and recomputes, from the module's own ``qkv`` projection, ``q_norm`` /
``k_norm``, ``scale`` and any ``attn_mask`` it is called with, the queries, keys, values and the
explicit attention weights ``softmax(q k^T * scale)``. The hooks are removed when the call ends.
Because the block itself is left alone, whatever surrounds the attention (layer scale ``ls1`` /
``ls2``, ``drop_path``, register tokens, DINOv2-style blocks built from timm's ``Block``) is handled
by the model's own forward. On a RoPE model (DINOv3, timm's ``EvaAttention``: Q / V biases apart, the
rotation passed to each block) ``q`` and ``k`` are those after the rotation, as the attention uses them, and
``k_content`` holds the keys before it.

Which keys discovery cuts on (:meth:`BlockQKV.patch_keys`): the keys **before** the rotation. RoPE turns
the key of patch j into ``R(p_j) k_j``, so the cosine of two rotated keys is ``k_i^T R(p_j - p_i) k_j``: it
depends on where the two patches are, and TokenCut's similarity graph would partly encode their distance
instead of their content. The un-rotated keys are the content (what a learned-position ViT's keys are
too: its position entered once, additively, at the input). The official DINOv3 code has no discovery or
attention-map tool (its notebooks use the final normed patch tokens), so there is nothing to follow there.

Storage (register) tokens and [OBJ] are prefix tokens: every patch map and the keys exclude them, so
patch outputs are exactly ``h * w``; :meth:`BlockQKV.storage_attention` says how much attention they take.

Shapes: ``B`` images, ``heads`` attention heads, ``N = num_prefix_tokens + h * w`` tokens where
``(h, w)`` is the patch grid of the input (its size divided by the patch size, any size).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import fused_qkv_bias, rotate_patches

__all__ = [
    "BlockQKV",
    "StorageAttention",
    "all_attentions",
    "attention_rollout",
    "attention_weights",
    "cls_attention_maps",
    "Inspection",
    "inspect_forward",
    "last_block",
    "last_block_heads",
    "last_block_keys",
    "patch_tokens",
    "qkv_from_input",
    "rollout_update",
]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once everything needed has been captured."""


@dataclass
class BlockQKV:
    """Queries, keys and values of one attention block, each (B, heads, N, head_dim), float32.

    ``q`` and ``k`` are after ``q_norm`` / ``k_norm`` (identity unless the model uses QK-norm) and
    ``q`` is *not* multiplied by ``scale``. ``attn_bias`` is the additive mask the block was called
    with (broadcastable to (B, heads, N, N)), or None. On a RoPE model ``q`` and ``k`` are rotated (as the
    attention uses them) and ``k_content`` is ``k`` before the rotation; without RoPE it is ``k`` itself.
    The prefix tokens are ``[CLS, (OBJ), registers...]``: the last ``num_reg_tokens`` of them are registers.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    num_prefix_tokens: int
    grid: tuple[int, int]
    attn_bias: Tensor | None = None
    k_content: Tensor | None = None
    num_reg_tokens: int = 0

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    def attention(self) -> Tensor:
        """All attention weights softmax(q k^T * scale [+ mask]), (B, heads, N, N); rows sum to one."""
        return attention_weights(self.q, self.k, self.scale, self.attn_bias)

    def cls_attention(self) -> Tensor:
        """CLS -> patch attention per head, (B, heads, h, w), each map summing to one.

        The CLS row of the attention restricted to the patch tokens and renormalised over them
        (what DINO's figures show: its code also divides by the sum before thresholding); this is
        the softmax of the CLS query's logits over the patch keys only. Costs O(N), not O(N^2).
        """
        logits = (self.q[:, :, :1] * self.scale) @ self.k.transpose(-2, -1)  # (B, heads, 1, N)
        if self.attn_bias is not None:
            bias = self.attn_bias.expand(*logits.shape[:2], self.q.shape[2], self.k.shape[2])[:, :, :1]
            logits = logits + bias
        patch = logits[:, :, 0, self.num_prefix_tokens :]
        h, w = self.grid
        return patch.softmax(dim=-1).reshape(patch.shape[0], patch.shape[1], h, w)

    def patch_keys(self) -> Tensor:
        """Keys of the patch tokens, all heads concatenated: (B, h * w, heads * head_dim); before any RoPE
        rotation (``k_content``: see the module docstring), prefix tokens dropped."""
        k = (self.k if self.k_content is None else self.k_content)[:, :, self.num_prefix_tokens :]
        return k.permute(0, 2, 1, 3).reshape(k.shape[0], k.shape[2], -1)

    def storage_attention(self) -> StorageAttention:
        """Where attention goes between [CLS], registers and patches in this block (see :class:`StorageAttention`).

        One head at a time, so memory stays at one (B, N, N) matrix.
        """
        b, heads, n, _ = self.q.shape
        h, w = self.grid
        prefix, regs = self.num_prefix_tokens, self.num_reg_tokens
        first_reg = prefix - regs
        reads = self.q.new_zeros(b, regs, h * w)
        read_by = self.q.new_zeros(b, regs, h * w)
        cls_mass = self.q.new_zeros(b, heads, 3)
        patch_mass = self.q.new_zeros(b, 3)
        bias = None if self.attn_bias is None else self.attn_bias.expand(b, heads, n, n)
        for i in range(heads):
            a = attention_weights(self.q[:, i], self.k[:, i], self.scale, None if bias is None else bias[:, i])
            reads += a[:, first_reg:prefix, prefix:] / heads
            read_by += a[:, prefix:, first_reg:prefix].transpose(1, 2) / heads
            cls_mass[:, i] = _mass(a[:, 0], first_reg, prefix)
            patch_mass += _mass(a[:, prefix:], first_reg, prefix).mean(dim=1) / heads
        return StorageAttention(reads.reshape(b, regs, h, w), read_by.reshape(b, regs, h, w), cls_mass, patch_mass)

    def output(self, attn_module: nn.Module) -> Tensor:
        """The attention module's output recomputed from these weights: proj(attention @ v), (B, N, D).

        Follows timm's ``Attention`` (``norm`` and ``gate`` are applied when the module has them); used
        by the tests to check that the explicit weights are the ones the model used.
        """
        x = self.attention() @ self.v  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        norm = getattr(attn_module, "norm", None)
        if norm is not None:
            x = norm(x.to(_dtype_of(norm, x)))
        return attn_module.proj(x.to(attn_module.proj.weight.dtype))


def _mass(rows: Tensor, first_reg: int, prefix: int) -> Tensor:
    """Attention rows (..., N) -> (..., 3): their mass on the other prefix tokens ([CLS], [OBJ]), on the
    registers (tokens ``first_reg`` to ``prefix``) and on the patches."""
    return torch.stack([rows[..., :first_reg].sum(-1), rows[..., first_reg:prefix].sum(-1),
                        rows[..., prefix:].sum(-1)], dim=-1)


@dataclass
class StorageAttention:
    """Attention to and from the storage (register) tokens in one block, for one batch (B images, R registers).

    ``reads`` (B, R, h, w): register r's query over the patches (its raw softmax weights, mean over heads: the
    map sums to the share of r's attention that goes to patches); ``read_by`` (B, R, h, w): the weight each
    patch query puts on register r's key (mean over heads); ``cls_mass`` (B, heads, 3) and ``patch_mass``
    (B, 3): the attention mass of the [CLS] query (per head) and of the patch queries (mean over patches and
    heads) on [CLS, OBJ] / registers / patches, each row summing to one.
    """

    reads: Tensor
    read_by: Tensor
    cls_mass: Tensor
    patch_mass: Tensor


def _dtype_of(module: nn.Module, default: Tensor) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else default.dtype


def _additive_mask(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean (True = attend) or additive float mask -> additive float mask, or None."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        return bias.masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def qkv_from_input(attn: nn.Module, x: Tensor, rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, heads, N, head_dim), float32, of a timm-style attention module for its input ``x``.

    Uses ``attn.qkv`` (one fused Linear, its bias where timm's ``EvaAttention`` keeps it),
    ``attn.num_heads``, ``attn.q_norm`` / ``attn.k_norm`` when present and the RoPE embedding ``rope``
    the block was called with (patch tokens only), exactly as timm's ``Attention`` / ``EvaAttention``
    forward does before the product.
    """
    return _qkv(attn, x, rope)[:3]


def _qkv(attn: nn.Module, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`qkv_from_input`'s q, k, v, and k before the RoPE rotation (None without ``rope``), float32."""
    q, k, v = _projections(attn, x)
    content = None
    if rope is not None:
        q, k, content = _rotated(attn, q, rope), _rotated(attn, k, rope), k.float()
    return q.float(), k.float(), v.float(), content


def _projections(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, heads, N, head_dim) of ``attn`` for ``x``, after ``q_norm`` / ``k_norm``, before any RoPE, in
    the compute dtype."""
    if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise TypeError(f"{type(attn).__name__} has no fused 'qkv' projection and 'num_heads'; "
                        "cannot recompute its attention weights")
    b, n, _ = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, fused_qkv_bias(attn)).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k, v


def _rotated(attn: nn.Module, t: Tensor, rope: Tensor) -> Tensor:
    """Queries or keys rotated by the block's RoPE embedding, as the attention module does (patches only)."""
    return rotate_patches(t, rope, attn.num_prefix_tokens, getattr(attn, "rotate_half", False))


def attention_weights(q: Tensor, k: Tensor, scale: float, attn_bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale + bias) over the last axis, float32, (..., Nq, Nk)."""
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if attn_bias is not None:
        logits = logits + attn_bias.float()
    return logits.softmax(dim=-1)


def _blocks(backbone: nn.Module) -> Sequence[nn.Module]:
    vit = getattr(backbone, "vit", backbone)
    blocks = getattr(vit, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"{type(backbone).__name__} has no transformer blocks at .vit.blocks")
    return blocks


def last_block_heads(backbone: nn.Module) -> int:
    """Number of attention heads of the last block."""
    return int(_blocks(backbone)[-1].attn.num_heads)


def _grid(backbone: nn.Module, x: Tensor) -> tuple[int, int]:
    p = int(backbone.patch_size)
    h, w = x.shape[-2], x.shape[-1]
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}; pad it first")
    return h // p, w // p


def _run_with_hooks(
    backbone: nn.Module,
    x: Tensor,
    on_block: Callable[[int, BlockQKV], None],
    block_ids: Sequence[int],
    stop_after_last: bool,
) -> dict[str, Tensor] | None:
    """Run ``backbone.forward_tokens(x)``, calling ``on_block(i, qkv)`` when block ``i`` attends.

    With ``stop_after_last`` the forward ends right after the last requested block's q/k/v are
    known (its attention, MLP and later blocks are skipped) and None is returned; otherwise the
    model's token outputs are returned.
    """
    blocks = _blocks(backbone)
    grid = _grid(backbone, x)
    prefix = int(backbone.num_prefix_tokens)
    regs = int(getattr(backbone, "num_reg_tokens", 0))
    ids = sorted({i % len(blocks) for i in block_ids})
    last = ids[-1]
    handles = []

    def make_hook(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inp = args[0] if args else kwargs["x"]
            q, k, v, content = _qkv(module, inp, kwargs.get("rope"))
            bias = _additive_mask(kwargs.get("attn_mask"), torch.float32)
            if kwargs.get("is_causal"):
                n = q.shape[2]
                causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
                causal_bias = _additive_mask(causal, torch.float32)
                bias = causal_bias if bias is None else bias + causal_bias
            scale = float(getattr(module, "scale", q.shape[-1] ** -0.5))
            on_block(i, BlockQKV(q, k, v, scale, prefix, grid, bias, content, regs))
            if stop_after_last and i == last:
                raise _StopForward

        return hook

    for i in ids:
        handles.append(blocks[i].attn.register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        out = backbone.forward_tokens(x)
    except _StopForward:
        return None
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def last_block(backbone: nn.Module, x: Tensor, stop_early: bool = True) -> BlockQKV:
    """q, k, v of the last block for images ``x`` (B, 3, H, W); H, W multiples of the patch size.

    With ``stop_early`` (default) the forward stops as soon as the last block's keys are known.
    """
    found: dict[int, BlockQKV] = {}
    _run_with_hooks(backbone, x, lambda i, t: found.__setitem__(i, t), [-1], stop_after_last=stop_early)
    return next(iter(found.values()))


def last_block_keys(backbone: nn.Module, x: Tensor) -> Tensor:
    """Keys of the last attention block for the patch tokens, heads concatenated: (B, h * w, D).

    The features TokenCut / LOST cut on (prefix tokens: CLS, registers... dropped).
    """
    return last_block(backbone, x).patch_keys()


def cls_attention_maps(backbone: nn.Module, x: Tensor) -> Tensor:
    """Last-block CLS -> patch attention per head, (B, heads, h, w), each map summing to one."""
    return last_block(backbone, x).cls_attention()


@torch.no_grad()
def all_attentions(backbone: nn.Module, x: Tensor) -> list[Tensor]:
    """The attention weights of every block, a list of (B, heads, N, N) float32 tensors.

    Memory grows as depth * heads * N^2 (12 blocks, 6 heads, 3600 tokens: 3.7 GB per image);
    :func:`attention_rollout` folds the maps in one at a time instead.
    """
    maps: dict[int, Tensor] = {}
    _run_with_hooks(backbone, x, lambda i, t: maps.__setitem__(i, t.attention()),
                    list(range(len(_blocks(backbone)))), stop_after_last=False)
    return [maps[i] for i in sorted(maps)]


def rollout_update(rollout: Tensor | None, attention: Tensor, head_fusion: str = "mean",
                   discard_ratio: float = 0.0) -> Tensor:
    """One step of attention rollout (Abnar & Zuidema 2020): ``R <- normalize(0.5 A + 0.5 I) @ R``.

    ``attention`` is one block's (B, heads, N, N); heads are fused by ``mean`` (the paper), ``max``
    or ``min``. ``discard_ratio`` zeroes that fraction of the smallest fused weights per row (never
    the diagonal) before adding the identity (a common variant; 0 gives the paper's rule). The
    identity stands for the residual connection; rows are renormalised to sum to one.
    """
    if head_fusion == "mean":
        a = attention.mean(dim=1)
    elif head_fusion == "max":
        a = attention.amax(dim=1)
    elif head_fusion == "min":
        a = attention.amin(dim=1)
    else:
        raise ValueError(f"head_fusion must be mean, max or min, got {head_fusion!r}")
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    if discard_ratio > 0:
        k = int(n * discard_ratio)
        if k > 0:
            off = a.masked_fill(eye.bool(), float("inf"))
            drop = off.topk(k, dim=-1, largest=False).indices
            a = a.scatter(-1, drop, 0.0)
    a = 0.5 * a + 0.5 * eye
    a = a / a.sum(dim=-1, keepdim=True)
    return a if rollout is None else a @ rollout


@torch.no_grad()
def attention_rollout(backbone: nn.Module, x: Tensor, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout across all blocks: the CLS row over the patch tokens, (B, h, w), summing to one.

    Folds each block's attention into the running product as it is computed, so memory stays at
    a few (B, N, N) matrices whatever the depth.
    """
    state: dict[str, Tensor | None] = {"r": None}

    def fold(i: int, t: BlockQKV) -> None:
        state["r"] = rollout_update(state["r"], t.attention(), head_fusion, discard_ratio)

    grid = _grid(backbone, x)
    _run_with_hooks(backbone, x, fold, list(range(len(_blocks(backbone)))), stop_after_last=True)
    r = state["r"]
    assert r is not None
    cls = r[:, 0, int(backbone.num_prefix_tokens):]
    cls = cls / cls.sum(dim=-1, keepdim=True)
    return cls.reshape(cls.shape[0], *grid)


@dataclass
class Inspection:
    """What one hooked forward pass saw: the last block's q/k/v, the model's token outputs
    (``{"cls": (B, D), "patch": (B, h * w, D)}``, registers apart), the norms of the last block's patch
    outputs before the final norm (B, h, w) and, when asked, the CLS rollout (B, h, w)."""

    last: BlockQKV
    tokens: dict[str, Tensor]
    patch_norms: Tensor
    rollout: Tensor | None = None


@torch.no_grad()
def inspect_forward(backbone: nn.Module, x: Tensor, rollout: bool = False, head_fusion: str = "mean",
                    discard_ratio: float = 0.0) -> Inspection:
    """One full forward of ``backbone.forward_tokens(x)`` that also records the last block's q/k/v, the norms
    of its patch outputs before the final LayerNorm (which would equalise them; where the high-norm
    outlier tokens of Darcet et al. 2024, "Vision Transformers Need Registers", show) and, with
    ``rollout``, folds every block's attention into the rollout (see :func:`attention_rollout`)."""
    blocks = _blocks(backbone)
    grid = _grid(backbone, x)
    state: dict[str, Any] = {"r": None, "last": None, "prenorm": None}

    def on_block(i: int, t: BlockQKV) -> None:
        if rollout:
            state["r"] = rollout_update(state["r"], t.attention(), head_fusion, discard_ratio)
        if i == len(blocks) - 1:
            state["last"] = t

    def on_norm(module: nn.Module, args: tuple[Any, ...]) -> None:
        state["prenorm"] = args[0]

    ids = list(range(len(blocks))) if rollout else [len(blocks) - 1]
    watch = getattr(backbone, "vit", backbone).norm.register_forward_pre_hook(on_norm)
    try:
        tokens = _run_with_hooks(backbone, x, on_block, ids, stop_after_last=False)
    finally:
        watch.remove()
    assert tokens is not None and state["last"] is not None and state["prenorm"] is not None
    patches = state["prenorm"][:, int(backbone.num_prefix_tokens):].float()
    norms = patches.norm(dim=-1).reshape(patches.shape[0], *grid)
    roll = None
    if rollout:
        cls = state["r"][:, 0, int(backbone.num_prefix_tokens):]
        roll = (cls / cls.sum(dim=-1, keepdim=True)).reshape(cls.shape[0], *grid)
    return Inspection(last=state["last"], tokens=tokens, patch_norms=norms, rollout=roll)


@torch.no_grad()
def patch_tokens(backbone: nn.Module, x: Tensor) -> Tensor:
    """Patch tokens after the final norm, (B, h, w, D) (the model's normal forward, nothing hooked)."""
    grid = _grid(backbone, x)
    tokens = backbone.forward_tokens(x)["patch"]
    return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])


def upsample_maps(maps: Tensor, size: tuple[int, int], mode: str = "nearest") -> Tensor:
    """(..., h, w) maps -> (..., H, W) by ``nearest`` (DINO's figures) or ``bilinear`` interpolation."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return out.reshape(*lead, *size)


def pad_to_patch_multiple(x: Tensor, patch_size: int) -> Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right to multiples of ``patch_size``."""
    h, w = x.shape[-2:]
    ph = math.ceil(h / patch_size) * patch_size - h
    pw = math.ceil(w / patch_size) * patch_size - w
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


__all__ += ["pad_to_patch_multiple", "upsample_maps"]
