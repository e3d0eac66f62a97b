"""Backbone + heads over a list of crops: the one place where crops are grouped (by role and resolution)."""
from __future__ import annotations

import torch
from torch import nn

from ..data.masking import true_positions
from .backbone import TokenBackbone


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def group_by_resolution(crops: list[torch.Tensor], first: int = 0) -> list[tuple[int, int]]:
    """Index ranges [start, end) of consecutive crops sharing one spatial size.

    ``first`` > 0 ends a group after crop ``first - 1`` whatever the sizes: ``crops[:first]`` (the
    global views) never share a forward with later crops (the local views), even of their size.
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or i == first or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropModel(nn.Module):
    """Runs the backbone once per group of same-size crops and the head once on all CLS tokens.

    ``forward(crops, ...)`` takes a list of V tensors (B, 3, H_v, W_v), globals first, and returns
    named outputs, crop-major (rows ``v*B:(v+1)*B`` belong to crop ``v``), as DINO's ``MultiCropWrapper``:

    - ``"cls"``: (V*B, K) head logits of the CLS tokens;
    - ``"cls_feat"``: (V*B, D) the backbone's CLS tokens (before the head);
    - ``"obj"``: (V*B, K) head logits of the [OBJ] tokens (ODIS), with ``obj_masks`` on a backbone built
      with ``obj_token=True``; ``head`` is shared with CLS (ODIS's default);
    - ``"obj_feat"``: (V*B, D) the backbone's [OBJ] tokens, each attending to its crop's object mask;
    - ``"patch_z"``: (G*B, P, d) the patch head's normalised bottleneck of every patch of the first
      resolution group (the G global views), with ``patches="targets"`` (the teacher):
      :meth:`patch_targets` turns it into logits once the masks are known (:meth:`masked_patch_targets` reads
      ``"patch_global"`` instead, where the masked patches' logits are all the objective reads);
    - ``"patch_masked"``: (M, K_p) patch-head logits of the M masked patches only, in the order of
      ``masks.nonzero()`` (view, image, patch), with ``patches="masked"``: the patch objective reads
      the student only there, so the head runs on those rows alone (gathered at ``mask_positions``, the
      flat positions of ``masks``' True entries computed on the host, when given: a boolean index waits
      for the device on a GPU);
    - ``"cls_attention"``: (G*B, P) last-block CLS -> patch attention of the first group, averaged
      over heads, with ``cls_attention=True`` (AttMask);
    - ``"patch_global"``: (G*B, P, D) the backbone's final-norm patch tokens of the first group (the
      mask token where ``masks`` say), with ``patch_tokens=True`` (Gram anchoring).

    ``masks`` (G*B, P) bool marks the patches of the first group replaced by the mask token.
    ``n_global`` (G) says that the first G crops are the global views: when they carry masks, patch
    outputs or attention, they form the first group on their own, so a local view of the global size is
    never masked (iBOT runs its local views in a separate call). None, or a step without such outputs:
    crops are grouped by size alone, as DINO's ``MultiCropWrapper``.
    ``obj_masks`` is a list of V tensors (B, P_v) bool, one per crop in crop order: the patches each
    crop's [OBJ] token may attend to. ``patch_head`` is a separate head for patch tokens (DINOv2's
    separate iBOT head); None shares ``head`` (iBOT's ``shared_head``).

    The head runs once on the CLS and [OBJ] rows together when it has no BatchNorm (row-wise: the same
    logits, one weight-normalisation of the last layer); a head with BatchNorm runs on the CLS rows
    alone, exactly as without [OBJ], and then on the [OBJ] rows, so the CLS term's batch statistics stay
    those of a DINO / iBOT run.
    """

    def __init__(self, backbone: TokenBackbone, head: nn.Module, patch_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor, masks: torch.Tensor | None = None,
                patches: str | None = None, cls_attention: bool = False,
                obj_masks: list[torch.Tensor] | None = None, cls_head: bool = True,
                n_global: int | None = None, patch_tokens: bool = False,
                mask_positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``cls_head=False`` leaves out ``"cls"`` (the head on the CLS rows) when no objective reads it
        (an ODIS or iBOT run without the [CLS] term); ``"cls_feat"`` is always returned."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if patches not in (None, "targets", "masked"):
            raise ValueError(f"patches must be None, 'targets' or 'masked', got {patches!r}")
        if patches == "masked" and masks is None:
            raise ValueError("patches='masked' needs masks")
        if obj_masks is not None:
            if not getattr(self.backbone, "has_obj_token", False):
                raise ValueError("obj_masks need a backbone built with obj_token=True")
            if len(obj_masks) != len(crops):
                raise ValueError(f"obj_masks must hold one mask per crop: {len(obj_masks)} for {len(crops)} crops")
        roles = masks is not None or patches is not None or cls_attention or patch_tokens
        groups = group_by_resolution(crops, first=n_global if roles and n_global else 0)
        if masks is not None and len(masks) != (groups[0][1] - groups[0][0]) * len(crops[0]):
            raise ValueError(f"masks has {len(masks)} rows for the {groups[0][1] - groups[0][0]} crop(s) of "
                             f"{len(crops[0])} images in the first group: give one row per global view and image")
        out: dict[str, torch.Tensor] = {}
        cls_feats, obj_feats = [], []
        for index, (s, e) in enumerate(groups):
            x = torch.cat(crops[s:e])
            first = index == 0
            obj_mask = None if obj_masks is None else torch.cat(obj_masks[s:e])
            if obj_mask is not None or (first and roles):
                tokens = self.backbone.forward_tokens(x, mask=masks if first else None,
                                                      cls_attention=cls_attention and first, obj_mask=obj_mask)
                cls_feats.append(tokens["cls"])
                if obj_mask is not None:
                    obj_feats.append(tokens["obj"])
                if not first:
                    continue
                if cls_attention:
                    out["cls_attention"] = tokens["cls_attention"]
                if patch_tokens:
                    out["patch_global"] = tokens["patch"]
                if patches == "targets":
                    b, p, d = tokens["patch"].shape
                    out["patch_z"] = self._patch_head.project(tokens["patch"].reshape(b * p, d)).view(b, p, -1)
                elif patches == "masked":
                    out["patch_masked"] = self._patch_head(masked_rows(tokens["patch"], masks, mask_positions))
            else:
                cls_feats.append(self.backbone(x))
        out["cls_feat"] = torch.cat(cls_feats)
        if obj_feats:
            out["obj_feat"] = torch.cat(obj_feats)
        if not cls_head:
            if obj_feats:
                out["obj"] = self.head(out["obj_feat"])
            return out
        if not obj_feats:
            out["cls"] = self.head(out["cls_feat"])
            return out
        if _has_batch_norm(self.head):
            out["cls"] = self.head(out["cls_feat"])
            out["obj"] = self.head(out["obj_feat"])
        else:
            out["cls"], out["obj"] = self.head(torch.cat([out["cls_feat"], out["obj_feat"]])).split(
                len(out["cls_feat"]))
        return out

    @property
    def _patch_head(self) -> nn.Module:
        return self.patch_head if self.patch_head is not None else self.head

    @property
    def patch_head_rowwise(self) -> bool:
        """Whether the patch head maps each row alone (no BatchNorm): then its logits of some patches need
        those patches only."""
        return not _has_batch_norm(self._patch_head)

    def masked_patch_targets(self, patch_tokens: torch.Tensor, masks: torch.Tensor,
                             positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`patch_targets` without ``"patch_mean"``, from the teacher's patch tokens (G*B, P, D)
        (``"patch_global"``): the whole patch head runs on the M masked patches only, as DINOv2's teacher
        does (``ibot_head`` on the masked tokens), where no center reads the mean of every patch's logits
        (Sinkhorn-Knopp) and the head is :attr:`patch_head_rowwise` (BatchNorm's statistics would change)."""
        if positions is None:
            positions = true_positions(masks)
        return {"patch_masked": self._patch_head(masked_rows(patch_tokens, masks, positions)),
                "patch_positions": positions}

    def patch_targets(self, patch_z: torch.Tensor, masks: torch.Tensor,
                      positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The teacher's patch logits that the patch objective reads, from ``patch_z`` (G*B, P, d):

        - ``"patch_masked"``: (M, K_p) logits of the M masked patches, in ``masks.nonzero()`` order;
        - ``"patch_mean"``: (1, K_p) the mean logit vector over all G*B*P patches (the center's update);
        - ``"patch_positions"``: (M,) the flat positions of those patches in (G*B*P), ``positions`` when
          given (computed on the host, so that nothing waits for the device), else from ``masks``.

        The head's last layer is linear without bias, so the mean of its outputs is its output of the
        mean: the (d -> K_p) layer runs on M + 1 rows instead of G*B*P (3,136 at ViT-S/16, 2 x 8 x 224),
        the same numbers as iBOT's head on every patch up to rounding.
        """
        last = self._patch_head.last_layer
        if positions is None:
            positions = true_positions(masks)
        return {"patch_masked": last(masked_rows(patch_z, masks, positions)),
                "patch_mean": last(patch_z.flatten(0, 1).float().mean(0, keepdim=True)),
                "patch_positions": positions}


def masked_rows(tokens: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``tokens[masks]``: the (M, D) rows of (N, P, D) ``tokens`` where (N, P) ``masks`` is True, row-major;
    gathered at ``positions`` (M,), the flat positions of the True entries, when given (no boolean index:
    on a GPU that waits for the device to count the rows)."""
    if positions is None:
        return tokens[masks]
    p = masks.shape[1]
    return tokens[torch.div(positions, p, rounding_mode="floor"), positions % p]
