"""iBOT (Zhou et al. 2022): the backbone releases and the full training checkpoints.

- release: ``{"state_dict": backbone}``;
- full checkpoint: like DINO's, whose backbone has ``masked_embed`` and whose head has ``last_layer2``.

Layer scale (trained with ``init_values``) is stored as ``blocks.i.gamma_1`` / ``gamma_2``, timm's
``ls1.gamma`` / ``ls2.gamma``.
"""
from __future__ import annotations

import re

from .base import Evidence, Layout, Rename


def _recognise(found: Evidence) -> bool:
    return ("masked_embed" in found.dropped or any(k.endswith("gamma_1") for k in found.original)
            or found.source == "state_dict")


LAYOUT = Layout(
    "ibot",
    recognise=_recognise,
    mask_tokens=("masked_embed",),
    renames=(
        Rename(re.compile(r"^(blocks\.\d+)\.gamma_1$"), r"\1.ls1.gamma"),
        Rename(re.compile(r"^(blocks\.\d+)\.gamma_2$"), r"\1.ls2.gamma"),
    ),
)
