"""Protocol constants shared by the evaluation tools and their command-line options, and the note every
tool gives on features of an untrained [CLS] (torch-free).

Kept apart from the tools so that ``ssl-distill <tool> --help`` can print the defaults, and ``report``
read a run, without importing torch (see :mod:`ssl_distill.cli_args`).
"""
from __future__ import annotations

from .config import Config

__all__ = ["DINOSEG_HEAD", "DINOSEG_MASS", "EPS", "LR_GRID", "TAU", "untrained_cls_note"]

# DINOv2's linear-evaluation learning rates (eval/linear.py), each scaled by batch / 256
LR_GRID: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
# TokenCut (Wang et al. 2022): similarity threshold of the patch graph and weight of dissimilar pairs
TAU = 0.2
EPS = 1e-5
# DINO-seg (the LOST / TokenCut baseline): the head LOST and TokenCut box for ViT-S/16, and the share of the
# attention mass DINO's figures keep
DINOSEG_HEAD = 4
DINOSEG_MASS = 0.6


def untrained_cls_note(cfg: Config, features: str) -> str | None:
    """One line when ``features`` (a feature layout's name, ``FeatureSpec.name()``: ``cls``, ``cls+mean@4``, ...)
    reads the [CLS] token of a run whose config trains no image-level [CLS] term (``dino.weight`` 0, as
    ODIS's recipes), else None."""
    if not features.startswith("cls") or cfg.dino.weight > 0:
        return None
    obj = " (the [OBJ] token its object term trained: --layout obj)" if cfg.odis.weight > 0 else ""
    return (f"the {features} features read the [CLS] token, which no loss of this run trained "
            f"(dino.weight=0); evaluate the obj layout instead{obj}")
