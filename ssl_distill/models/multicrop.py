"""Backbone + head over a list of crops: the one place where crops are grouped by resolution."""
from __future__ import annotations

import torch
from torch import nn

from .backbone import ViTBackbone


def group_by_resolution(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Index ranges [start, end) of consecutive crops sharing one spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropModel(nn.Module):
    """Runs the backbone once per group of same-size crops and the head once on all CLS tokens.

    ``forward(crops)``: list of V tensors (B, 3, H_v, W_v) -> logits (V * B, out_dim), crop-major
    (rows ``v*B:(v+1)*B`` belong to crop ``v``), as DINO's ``MultiCropWrapper``.
    """

    def __init__(self, backbone: ViTBackbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = [self.backbone(torch.cat(crops[s:e])) for s, e in group_by_resolution(crops)]
        return self.head(torch.cat(feats))
