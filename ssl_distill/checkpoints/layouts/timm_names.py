"""timm: a state dict in timm's own names (what ``ssl-distill export`` writes; also ``.safetensors``).

Nothing to rename; told apart from a DINO release by what DINO has not: ``reg_token`` (with
``no_embed_class``) or layer scale.
"""
from __future__ import annotations

from .base import Evidence, Layout


def _recognise(found: Evidence) -> bool:
    return "reg_token" in found.state or any(k.endswith("ls1.gamma") for k in found.state)


LAYOUT = Layout("timm", recognise=_recognise)
