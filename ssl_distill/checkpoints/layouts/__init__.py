"""The official checkpoint layouts, one file each, and the conversion of their backbones to timm's names.

======================  ==========================================================================
``dinov3.py``           DINOv3 releases and training outputs, and timm's ``Eva`` names for them (RoPE)
``dinov2.py``           DINOv2 releases and training outputs (chunked blocks, SwiGLU, registers)
``ibot.py``             iBOT releases and training checkpoints (``gamma_1`` / ``gamma_2`` layer scale)
``timm_names.py``       timm's own names (what ``ssl-distill export`` writes)
``dino.py``             DINO releases and training checkpoints (already timm's names)
``base.py``             what a layout declares: :class:`Layout`, :class:`Rename`, :class:`Evidence`;
                        what a conversion gives: :class:`TimmState`
======================  ==========================================================================

A DINOv3 backbone (:func:`dinov3.claims`) becomes timm's ``Eva`` names through :func:`dinov3.to_eva`: a
model of another kind, whose renames would fight those of the learned-position layouts (iBOT's ``gamma_1``
is DINOv3's timm name). For the others, :func:`to_timm_layout` drops every layout's mask tokens
(``mask_token``, ``masked_embed``: only used for masked-image-modelling training), applies every layout's
renames to each key and then their register steps, and names the first layout of :data:`LAYOUTS` that
recognises the result. Another layout is one more file with a :class:`Layout` and its place in :data:`LAYOUTS`.
"""
from __future__ import annotations

from torch import Tensor

from ...errors import CheckpointError
from . import dino, dinov2, dinov3, ibot, timm_names
from .base import Evidence, Layout, Rename, TimmState

__all__ = ["LAYOUTS", "MASK_TOKENS", "Evidence", "Layout", "Rename", "TimmState", "to_timm_layout"]

# in the order they are asked to recognise a converted state (DINO: whatever no other layout claims)
LAYOUTS: tuple[Layout, ...] = (dinov2.LAYOUT, ibot.LAYOUT, timm_names.LAYOUT, dino.LAYOUT)
MASK_TOKENS = tuple(k for layout in LAYOUTS for k in layout.mask_tokens)


def to_timm_layout(state: dict[str, Tensor], source: str = "") -> TimmState:
    """Rename an official backbone state dict (prefix already removed) to timm's names: ``VisionTransformer``'s,
    or ``Eva``'s for DINOv3."""
    if dinov3.claims(state):
        return dinov3.to_eva(state)
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    changed: set[str] = set()
    swiglu = False
    mask_token = None
    for k, v in state.items():
        if k in MASK_TOKENS:
            dropped.append(k)
            mask_token = v.reshape(1, -1)
            continue
        new = k
        for layout in LAYOUTS:
            for rename in layout.renames:
                renamed = rename.pattern.sub(rename.repl, new)
                if renamed != new:
                    changed.add(layout.name)
                    swiglu = swiglu or rename.swiglu
                new = renamed
        if new in out:
            raise CheckpointError(f"keys {origin[new]!r} and {k!r} both map to {new!r}")
        out[new] = v
        origin[new] = k
    registers = False
    for layout in LAYOUTS:
        if layout.registers is not None and layout.registers(out, origin):
            changed.add(layout.name)
            registers = True
    found = Evidence(state, out, source, dropped, frozenset(changed))
    name = next(layout.name for layout in LAYOUTS if layout.recognise(found))
    return TimmState(out, origin, dropped, name, swiglu, registers, mask_token=mask_token)
