"""Checkpoint or run directory -> the frozen backbone an evaluation runs: where every tool of eval/ loads its model.

Any file :func:`ssl_distill.checkpoints.load_any_backbone` reads (our run directories and files, official
DINO / iBOT / DINOv2 releases) gives a frozen backbone in eval mode. A ``--random-init`` baseline is the same
architecture ([OBJ] token included) with fresh weights from
:func:`~ssl_distill.models.backbone.random_init_like`, seeded with the run's ``run.seed`` (the default
config's for official files) unless a seed is given: every tool draws the same weights for one checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from ssl_distill.checkpoints import LoadedBackbone, load_any_backbone
from ssl_distill.models.backbone import TokenBackbone, random_init_like

__all__ = ["EvalModel", "load_model"]


class EvalModel(NamedTuple):
    """The backbone to evaluate and the checkpoint it was read from."""

    backbone: TokenBackbone  # frozen, eval mode; fresh weights for a random-init baseline
    loaded: LoadedBackbone  # the checkpoint: file, format, source entry, config, and its own backbone

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the model was trained with (``data.crops``; ImageNet's for official files)."""
        crops = self.loaded.config.data.crops
        return tuple(crops.mean), tuple(crops.std)


def load_model(checkpoint: str | Path, which: str | None = None, *, key: str | None = None,
               random_init: bool = False, seed: int | None = None, device: str | torch.device | None = None,
               **spec_overrides: Any) -> EvalModel:
    """The frozen backbone of ``checkpoint`` (a checkpoint file or a run directory), in eval mode.

    Args:
        which, key, spec_overrides: as :func:`ssl_distill.checkpoints.load_any_backbone` (``which``:
            ``"teacher"`` by default where both exist; ``spec_overrides`` such as ``num_heads`` for
            official files).
        random_init: the same architecture with fresh weights instead of the checkpoint's.
        seed: the random-init seed; None takes the run's ``run.seed``.
        device: where the backbone is moved; None leaves it on the CPU.
    """
    loaded = load_any_backbone(checkpoint, which, key, **spec_overrides)
    backbone = loaded.backbone
    if random_init:
        backbone = random_init_like(backbone, loaded.config.run.seed if seed is None else seed)
    if device is not None:
        backbone.to(device)
    return EvalModel(backbone, loaded)
