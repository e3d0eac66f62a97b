"""DINO (Caron et al. 2021): the backbone releases and the full training checkpoints.

- backbone release: a bare state dict already in timm's names (``dino_deitsmall16_pretrain.pth``);
- full training checkpoint: ``{"teacher": {"backbone.*", "head.*"}, "student": {"module.backbone.*", ...},
  "args": argparse.Namespace, "optimizer", "epoch", "dino_loss"}``; the head's last layer is stored as
  ``weight_g`` / ``weight_v`` (ignored here).

Nothing to rename; what no other layout recognises is DINO's.
"""
from __future__ import annotations

from .base import Evidence, Layout


def _recognise(found: Evidence) -> bool:
    return True


LAYOUT = Layout("dino", recognise=_recognise)
