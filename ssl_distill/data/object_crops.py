"""Object-aware multi-crop views for ODIS (Hızlı, Yıldız and Marttinen 2025, arXiv 2506.05409).

ODIS distills one object per image: both global views must show the same object, and the [OBJ]
token of each view attends to that object's patches only. What we could read: the paper's abstract
and introduction, the co-author's project page (cagatayyildiz.github.io/projects/odis: "for each image
we sample a target bounding box, then resample random crops (up to 20 times each) until both crops
contain the box"; the box is then patchified into a binary mask) and the derivative code
``KarahanS/Cross-Time-Self-Distillation`` (``training/loader_vidor_odis.py``: 10 tries for the first
global crop, 20 for the second, 10 per local crop, a 4% minimum object area). Per image (its boxes from
:mod:`ssl_distill.data.boxes`), :meth:`ObjectMultiCropTransform.draw` picks the **target** by
``target_box``:

- ``"sample"`` (the project page, the default): the target is drawn uniformly among the image's boxes
  (those with an area inside the image) before any crop; then every global crop is drawn up to
  :data:`OTHER_GLOBAL_TRIES` (20) times until it **contains** the target;
- ``"largest"`` (our earlier rule): the first global crop is drawn up to :data:`FIRST_GLOBAL_TRIES`
  (10) times until some box **covers** at least ``min_object_cover`` (4%) of it, where cover =
  (area of box ∩ crop) / (area of crop); the target is the box with the largest visible area
  ``|box ∩ crop|`` in that crop (the first such box on ties); every other global crop is drawn up to
  20 times until it contains the target.

Contains: the target covers at least ``min_object_cover`` of that crop, the same test in every view
(our definition: the sources do not define it; the derivative code asks any pixel of the object in the
second view); with ``min_object_inside`` > 0 a global crop must also hold that share of the target box's
area (:func:`inside_fraction`; 1 is the project page's words read literally, the whole box in both crops),
and with ``object_dominant`` the target must be the crop's dominant item (:func:`dominant_item`: no other
box shows more of its area; our rule, no source states one).
4% of the view lets a crop hold a sliver of the target beside a larger neighbour, so on scenes of several
items the two views' dominant items still differ (``experiments/odis_benchmark.py --stats`` measures it);
most of the box in each view makes the target the item both views show. Local crops: plain, or with ``object_aware_local``, drawn up to :data:`LOCAL_TRIES_PER_VIEW` x
``n_local`` (10 L) times in all, keeping the first L that contain the target and topping up with
the first rejected draws (those do not contain it, so they are not valid for the object term).

The paper's two ablations (``ablation``): ``cropping_only`` draws these crops and returns the views alone
(the [CLS] term on object-aware crops, no [OBJ]); ``masking_only`` keeps the plain views and samples the
target as above, each view valid where the target covers ``min_object_cover`` of it (locals: all valid
iff a global is, without ``object_aware_local``), [OBJ] on its box there.

When no pair is found, the sample gets exactly the plain views of
:class:`~ssl_distill.data.views.MultiCropTransform` with the same seed, and its object term is
invalid. An image without any box does too with ``no_box="none"``; with ``no_box="whole_image"`` its
plain views are all valid and [OBJ] sees every patch of each (an image-level term on the [OBJ] token;
no source says what the authors do there). Every crop draw uses the plain views' algorithm and settings
(torchvision's RandomResizedCrop with the view's ``scale`` and ``ratio``, flip with ``flip_p``); the first
try of each view *is* the plain view's draw, so an image whose plain crops already qualify gets exactly
its plain views. The photometric augmentation (:class:`~ssl_distill.data.collate.MultiCropCollate`)
is untouched.

Every crop, resize and flip moves the target box: :func:`boxes_in_view` maps it to each view's
pixels (clipped to the view), and :func:`~ssl_distill.data.boxes.patch_mask_from_boxes`'s rule turns it
into the view's object mask on its patch grid (a patch belongs to the object if any of its pixels is
inside the box). Masks and validity, per view v:

- ``obj_valid[v]``: a global view is valid iff the pair was found. A local view is valid
  iff it contains the target, with ``object_aware_local``; without it, iff the pair was found
  (its [OBJ] then sees the whole local view and is asked to predict the teacher's object from it).
- ``obj_masks[v]``: the target box on the patch grid for valid global views and valid object-aware
  local views; all-True ([OBJ] sees the whole view) otherwise. Invalid views add nothing to the loss;
  all-True keeps their [OBJ] forward well defined.

Randomness: the first try of view v is the plain draw (``Stream.GEOMETRY``, key v); the further tries
and the sampled target read :func:`~ssl_distill.data.rng.counter_uniforms` on ``Stream.OBJECT_CROPS``
with their own keys, all from the sample seed (a function of (run seed, epoch, index)): a sample's views
do not depend on the batch, the rank or the number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ssl_distill.config import ODIS_ABLATIONS, ODIS_NO_BOX, ODIS_TARGET_BOX, CropsConfig
from ssl_distill.data.rng import Stream, counter_uniforms
from ssl_distill.data.views import VIEW_UNIFORMS, CropBox, MultiCropTransform, view_crop

__all__ = ["ObjectMultiCropTransform", "ObjectViews", "boxes_in_view", "dominant_item", "inside_fraction",
           "visible_fraction"]

FIRST_GLOBAL_TRIES = 10
OTHER_GLOBAL_TRIES = 20
LOCAL_TRIES_PER_VIEW = 10
_GLOBAL_KEY = 1 << 8  # key of global view g, try t >= 1: g * 256 + t
_LOCAL_KEY = 1 << 24  # key of local draw k >= n_local: 2**24 + k
_TARGET_KEY = 1 << 20  # key of the uniform that samples the target box (target_box="sample")


def visible_fraction(boxes: np.ndarray, crop: CropBox) -> np.ndarray:
    """(area of box ∩ crop) / (area of crop) per box: boxes float (n, 4) xyxy in image pixels -> (n,)."""
    iw = np.minimum(boxes[:, 2], crop.left + crop.width) - np.maximum(boxes[:, 0], crop.left)
    ih = np.minimum(boxes[:, 3], crop.top + crop.height) - np.maximum(boxes[:, 1], crop.top)
    return np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None) / float(crop.width * crop.height)


def _cover(box: Sequence[float], crop: CropBox) -> float:
    """:func:`visible_fraction` of one box, on Python floats (a handful of boxes per image: no arrays)."""
    iw = min(box[2], crop.left + crop.width) - max(box[0], crop.left)
    ih = min(box[3], crop.top + crop.height) - max(box[1], crop.top)
    return iw * ih / (crop.width * crop.height) if iw > 0 and ih > 0 else 0.0


def inside_fraction(box: Sequence[float], crop: CropBox) -> float:
    """(area of box ∩ crop) / (area of box) of one xyxy box in image pixels: how much of the box the crop holds."""
    iw = min(box[2], crop.left + crop.width) - max(box[0], crop.left)
    ih = min(box[3], crop.top + crop.height) - max(box[1], crop.top)
    return iw * ih / ((box[2] - box[0]) * (box[3] - box[1])) if iw > 0 and ih > 0 else 0.0


def dominant_item(boxes: np.ndarray, crop: CropBox) -> int:
    """Index of the box with the largest area inside ``crop`` (the first of equal areas), -1 when none reaches
    in: the item a view mostly shows. ``boxes``: float (n, 4) xyxy in image pixels."""
    if len(boxes) == 0:
        return -1
    area = visible_fraction(boxes, crop)
    best = int(np.argmax(area))
    return best if area[best] > 0 else -1


def boxes_in_view(box: Sequence[float], crops: Sequence[CropBox], sizes: Sequence[int]) -> np.ndarray:
    """One image box in each view's pixel coordinates, clipped to the view.

    View v crops ``[left, left + w) x [top, top + h)``, resizes it to ``s x s`` (so x -> (x - left) s / w,
    y -> (y - top) s / h, continuous pixel-edge coordinates, as PIL's ``resize(box=...)``) and, when
    flipped, mirrors x -> s - x. A box outside the crop maps to a zero-area box on the crop's edge.

    Args:
        box: (4,) xyxy in image pixels.
        crops: V crops; sizes: V output sizes.

    Returns:
        float64 (V, 4) xyxy.
    """
    bx0, by0, bx1, by1 = (float(v) for v in box)
    out = []
    for c, s in zip(crops, sizes):
        right, bottom = c.left + c.width, c.top + c.height
        # multiply first, then divide: exact whenever the result is representable
        x0 = (min(max(bx0, c.left), right) - c.left) * s / c.width
        x1 = (min(max(bx1, c.left), right) - c.left) * s / c.width
        y0 = (min(max(by0, c.top), bottom) - c.top) * s / c.height
        y1 = (min(max(by1, c.top), bottom) - c.top) * s / c.height
        out.append((s - x1, y0, s - x0, y1) if c.flip else (x0, y0, x1, y1))
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def _grid_mask(boxes: np.ndarray, size: int, patch_size: int) -> np.ndarray:
    """:func:`~ssl_distill.data.boxes.patch_mask_from_boxes` of a square view in numpy: (k, 4) -> bool (k, g * g)."""
    edges = np.arange(size // patch_size, dtype=np.float64) * patch_size
    cols = (boxes[:, 0:1] < edges + patch_size) & (boxes[:, 2:3] > edges)
    rows = (boxes[:, 1:2] < edges + patch_size) & (boxes[:, 3:4] > edges)
    rows &= ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[:, None]
    return (rows[:, :, None] & cols[:, None, :]).reshape(len(boxes), -1)


@dataclass
class ObjectViews:
    """The geometry of one sample's views and its target object.

    Attributes:
        crops: V crops, globals first.
        target: index of the target in the boxes given to :meth:`ObjectMultiCropTransform.draw`;
            -1 when no valid pair was found or the image has no box (the crops are then the plain ones).
        view_boxes: float64 (V, 4) the target box in each view's pixels, clipped to the view
            (zeros when target == -1).
        valid: bool (V,) where view v holds the target for the object term.
    """

    crops: list[CropBox]
    target: int
    view_boxes: np.ndarray
    valid: np.ndarray

    @property
    def paired(self) -> bool:
        return self.target >= 0


class ObjectMultiCropTransform:
    """``(img, seed, boxes) -> {"image", "obj_masks", "obj_valid"}``: multi-crop views that share an object.

    Output (V = n_global + n_local views, globals first)::

        {"image": list of V uint8 (3, s, s)   # as MultiCropTransform; exactly its views without a pair
         "obj_masks": list of V bool (P_v,)    # P_v = (s // patch_size) ** 2, row-major patch grid
         "obj_valid": bool (V,)}

    ``boxes``: float (n, 4) xyxy in image pixels (``BoxesFile.boxes_for(...)[0]``), n may be 0.
    Settings come from ``crops`` (``min_object_cover``, ``min_object_inside``, ``object_dominant``,
    ``object_aware_local``) and
    ODIS's ``target_box``
    (``odis.target_box``: sample | largest) and ``no_box`` (``odis.no_box``: none | whole_image).
    """

    def __init__(self, crops: CropsConfig, patch_size: int, target_box: str = "sample", no_box: str = "none",
                 ablation: str = "none", gram_from_epoch: int | None = 0) -> None:
        if not 0.0 < crops.min_object_cover <= 1.0:
            raise ValueError(f"crops.min_object_cover must be in (0, 1], got {crops.min_object_cover}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if target_box not in ODIS_TARGET_BOX or no_box not in ODIS_NO_BOX:
            raise ValueError(f"target_box must be one of {ODIS_TARGET_BOX} and no_box one of {ODIS_NO_BOX}, "
                             f"got {target_box!r}, {no_box!r}")
        self.plain = MultiCropTransform(crops, gram_from_epoch)
        self.views = self.plain.views
        self.sizes = [spec.size for spec in self.views]
        self.n_global, self.n_local = int(crops.n_global), int(crops.n_local)
        self.cover = float(crops.min_object_cover)
        self.inside = float(crops.min_object_inside)
        self.dominant = bool(crops.object_dominant)
        if not 0.0 <= self.inside <= 1.0:
            raise ValueError(f"crops.min_object_inside must be in [0, 1], got {self.inside}")
        self.object_aware_local = bool(crops.object_aware_local)
        self.patch_size = int(patch_size)
        if ablation not in ODIS_ABLATIONS:
            raise ValueError(f"ablation must be one of {ODIS_ABLATIONS}, got {ablation!r}")
        self.target_box, self.no_box, self.ablation = target_box, no_box, ablation

    # ---------------------------------------------------------------------------------- geometry
    def holds(self, boxes: Sequence[Sequence[float]], target: int, crop: CropBox) -> bool:
        """Whether a global crop holds box ``target`` of ``boxes`` (xyxy): it covers ``min_object_cover`` of the
        crop, the crop holds ``min_object_inside`` of the box and, with ``object_dominant``, no other box shows
        more of its area in the crop (:func:`dominant_item`)."""
        box = boxes[target]
        return (_cover(box, crop) >= self.cover and (self.inside == 0.0 or inside_fraction(box, crop) >= self.inside)
                and (not self.dominant or dominant_item(np.asarray(boxes, dtype=np.float64), crop) == target))

    def _candidates(self, width: int, height: int, seed: int, view: int, plain: Sequence[CropBox],
                    first_key: int, tries: int) -> Iterator[CropBox]:
        """The plain draws given, then ``tries - len(plain)`` draws keyed ``first_key + k`` (computed on demand)."""
        yield from plain
        spec = self.views[view]
        keys = range(first_key + len(plain), first_key + tries)
        if len(keys):
            for u in counter_uniforms([seed], Stream.OBJECT_CROPS, keys, VIEW_UNIFORMS)[0]:
                yield view_crop(width, height, spec.scale, self.plain.ratio, self.plain.crops.flip_p, u)

    def draw(self, width: int, height: int, seed: int, boxes: np.ndarray) -> ObjectViews:
        """The views' crops, target and validity for a ``width x height`` image with ``boxes`` (n, 4) xyxy."""
        plain = self.plain.geometry(width, height, seed)
        n_views, n_global, n_local, cover = len(plain), self.n_global, self.n_local, self.cover
        no_pair = ObjectViews(plain, -1, np.zeros((n_views, 4)), np.zeros(n_views, dtype=bool))
        b = []  # (original index, [x0, y0, x1, y1] clipped to the image) of the boxes with an area
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist()):
            x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
            y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
            if x1 > x0 and y1 > y0:
                b.append((i, (x0, y0, x1, y1)))
        if not b:
            if self.no_box == "whole_image":  # plain views, each valid, [OBJ] on every patch
                return ObjectViews(plain, -1, np.zeros((n_views, 4)), np.ones(n_views, dtype=bool))
            return no_pair
        chosen: list[CropBox] = []
        xyxy = [box for _, box in b]
        if self.target_box == "sample":  # the box first, then every global crop around it
            u = counter_uniforms([seed], Stream.OBJECT_CROPS, _TARGET_KEY, 1)[0, 0]
            at, first_global = min(int(u * len(b)), len(b) - 1), 0
        else:  # the largest box the first global crop shows
            at, first_global = -1, 1
            tries = 1 if self.ablation == "masking_only" else FIRST_GLOBAL_TRIES
            for crop in self._candidates(width, height, seed, 0, plain[:1], 0, tries):
                fractions = [_cover(box, crop) for _, box in b]
                best = max(range(len(b)), key=fractions.__getitem__)  # the first of equal areas
                if self.holds(xyxy, best, crop):
                    at, chosen = best, [crop]
                    break
            if at < 0:
                return no_pair
        target = b[at]
        box = target[1]
        if self.ablation == "masking_only":  # the plain views; each valid where it shows the target
            valid = np.array([_cover(box, c) >= cover for c in plain])
            if not self.object_aware_local:
                valid[n_global:] = valid[:n_global].any()
            return ObjectViews(plain, target[0], boxes_in_view(box, plain, self.sizes), valid)
        for g in range(first_global, n_global):
            for crop in self._candidates(width, height, seed, g, plain[g : g + 1], g * _GLOBAL_KEY, OTHER_GLOBAL_TRIES):
                if self.holds(xyxy, at, crop):
                    chosen.append(crop)
                    break
            else:
                return no_pair
        valid = np.ones(n_views, dtype=bool)
        if not self.object_aware_local or n_local == 0:
            chosen += plain[n_global:]
        else:
            accepted: list[CropBox] = []
            rejected: list[CropBox] = []
            for crop in self._candidates(width, height, seed, n_global, plain[n_global:], _LOCAL_KEY,
                                         LOCAL_TRIES_PER_VIEW * n_local):
                if _cover(box, crop) >= cover:
                    accepted.append(crop)
                    if len(accepted) == n_local:
                        break
                else:
                    rejected.append(crop)
            chosen += accepted + rejected[: n_local - len(accepted)]
            valid[n_global + len(accepted) :] = False
        return ObjectViews(chosen, target[0], boxes_in_view(box, chosen, self.sizes), valid)

    # ---------------------------------------------------------------------------------- masks
    def object_masks(self, views: ObjectViews) -> list[torch.Tensor]:
        """V bool (P_v,): the target box on the patch grid for valid global views (and valid local
        views with ``object_aware_local``), all-True for every other view (and every view of a sample
        without a target)."""
        out: list[torch.Tensor] = []
        for lo, hi, box_views in ((0, self.n_global, True), (self.n_global, len(views.crops), self.object_aware_local)):
            if hi == lo:
                continue
            size = self.sizes[lo]
            masks = np.ones((hi - lo, (size // self.patch_size) ** 2), dtype=bool)
            if box_views and views.paired and views.valid[lo:hi].any():
                use = views.valid[lo:hi]
                masks[use] = _grid_mask(views.view_boxes[lo:hi][use], size, self.patch_size)
            out.extend(torch.from_numpy(masks))
        return out

    def __call__(self, img: Image.Image, seed: int, boxes: np.ndarray | None = None,
                 epoch: int | None = None) -> dict[str, object]:
        if img.mode != "RGB":
            img = img.convert("RGB")
        views = self.draw(img.width, img.height, seed, np.zeros((0, 4)) if boxes is None else boxes)
        image = self.plain.render(img, views.crops, self.plain.renders_gram(epoch))
        if self.ablation == "cropping_only":  # the crops only: no [OBJ] to mask
            return {"image": image}
        return {"image": image, "obj_masks": self.object_masks(views),
                "obj_valid": torch.from_numpy(views.valid.copy())}
