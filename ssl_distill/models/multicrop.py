"""Backbone + heads over a list of crops: the one place where crops are grouped by resolution."""
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

    ``forward(crops, ...)`` takes a list of V tensors (B, 3, H_v, W_v), globals first, and returns
    named outputs, crop-major (rows ``v*B:(v+1)*B`` belong to crop ``v``), as DINO's ``MultiCropWrapper``:

    - ``"cls"``: (V*B, K) head logits of the CLS tokens;
    - ``"cls_feat"``: (V*B, D) the backbone's CLS tokens (before the head);
    - ``"patch"``: (G*B, P, K_p) patch-head logits of every patch of the first resolution group (the
      G global views), with ``patches="all"``;
    - ``"patch_masked"``: (M, K_p) patch-head logits of the M masked patches only, in the order of
      ``masks.nonzero()`` (view, image, patch), with ``patches="masked"``: the patch objective reads
      the student only there, so the head runs on those rows alone;
    - ``"cls_attention"``: (G*B, P) last-block CLS -> patch attention of the first group, averaged
      over heads, with ``cls_attention=True`` (AttMask).

    ``masks`` (G*B, P) bool marks the patches of the first group replaced by the mask token.
    ``patch_head`` is a separate head for patch tokens (DINOv2's separate iBOT head); None shares
    ``head`` (iBOT's ``shared_head``).
    """

    def __init__(self, backbone: ViTBackbone, head: nn.Module, patch_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor, masks: torch.Tensor | None = None,
                patches: str | None = None, cls_attention: bool = False) -> dict[str, torch.Tensor]:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if patches not in (None, "all", "masked"):
            raise ValueError(f"patches must be None, 'all' or 'masked', got {patches!r}")
        if patches == "masked" and masks is None:
            raise ValueError("patches='masked' needs masks")
        out: dict[str, torch.Tensor] = {}
        cls_feats = []
        for index, (s, e) in enumerate(group_by_resolution(crops)):
            x = torch.cat(crops[s:e])
            if index == 0 and (masks is not None or patches or cls_attention):
                tokens = self.backbone.forward_tokens(x, mask=masks, cls_attention=cls_attention)
                cls_feats.append(tokens["cls"])
                if cls_attention:
                    out["cls_attention"] = tokens["cls_attention"]
                if patches is not None:
                    patch_head = self.patch_head if self.patch_head is not None else self.head
                    if patches == "all":
                        b, p, d = tokens["patch"].shape
                        out["patch"] = patch_head(tokens["patch"].reshape(b * p, d)).view(b, p, -1)
                    else:
                        out["patch_masked"] = patch_head(tokens["patch"][masks])
            else:
                cls_feats.append(self.backbone(x))
        out["cls_feat"] = torch.cat(cls_feats)
        out["cls"] = self.head(out["cls_feat"])
        return out
