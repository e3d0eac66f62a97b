"""DINOv2 (Oquab et al. 2024): the backbone releases and the training outputs.

- bare release: patch 14, ``pos_embed`` for 518 px, layer scale as ``ls1`` / ``ls2.gamma``,
  ``mask_token``, ``register_tokens`` in the ``_reg4`` models, SwiGLU ``mlp.w12`` / ``mlp.w3`` for ViT-g;
- training outputs: chunked ``blocks.<chunk>.<i>`` keys, as ``{"teacher": {"backbone.*", "dino_head.*",
  ...}}`` or ``{"model": {"teacher.backbone.*", "student.backbone.*", ...}}``.

To timm's names: chunked blocks are flattened (the inner index already is the global block index:
chunk ``c`` pads its list with ``Identity`` modules); ``w12`` / ``w3`` become ``fc1`` / ``fc2`` (timm's
``SwiGLUPacked`` computes ``silu(x1) * x2`` of the same packed halves); registers become timm's
``reg_token``, with the class token's position term folded into ``cls_token`` (registers carry no
position term in DINOv2).
"""
from __future__ import annotations

import re

from torch import Tensor

from ...errors import CheckpointError
from .base import Evidence, Layout, Rename


def _registers(state: dict[str, Tensor], origin: dict[str, str]) -> bool:
    """``register_tokens`` -> ``reg_token``; ``cls_token`` takes ``pos_embed[:, 0]``, which ``pos_embed`` drops."""
    if "register_tokens" not in state:
        return False
    if "pos_embed" not in state or "cls_token" not in state:
        raise CheckpointError("register_tokens without cls_token / pos_embed")
    state["reg_token"] = state.pop("register_tokens")
    origin["reg_token"] = origin.pop("register_tokens")
    pos = state["pos_embed"]
    state["cls_token"] = state["cls_token"] + pos[:, :1]
    state["pos_embed"] = pos[:, 1:]
    return True


def _recognise(found: Evidence) -> bool:
    return "dinov2" in found.changed or "mask_token" in found.dropped


LAYOUT = Layout(
    "dinov2",
    recognise=_recognise,
    mask_tokens=("mask_token",),
    renames=(
        Rename(re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$"), r"blocks.\1.\2"),  # chunked blocks, flattened
        Rename(re.compile(r"^(blocks\.\d+\.mlp)\.w12\."), r"\1.fc1.", swiglu=True),
        Rename(re.compile(r"^(blocks\.\d+\.mlp)\.w3\."), r"\1.fc2.", swiglu=True),
    ),
    registers=_registers,
)
