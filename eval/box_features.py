"""One feature per box of a COCO boxes file, for object-level evaluation (ODIS's "masks at inference time",
Hızlı et al. 2025): the [OBJ] token with the box's patch mask, the CLS of the box crop, or the CLS of the
whole scene (:func:`extract_box_features`), the box crop resized to the view or pasted at the scene's scale on a
black canvas; and the raw-pixel baseline of a box (:func:`pixel_crop_feature`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl_distill.models.frozen_features import prepare_inference

from .features import ImageSettings

#: what to do about an unreadable image of a boxes file's folder (object-level evaluations read every one)
UNREADABLE_HINT = "replace or repair it, or delete it and its entries from the boxes file"

__all__ = [
    "BOX_MODES",
    "BoxFeatures",
    "boxes_to_view",
    "crop_tensor",
    "extract_box_features",
    "native_crop_tensor",
    "pixel_crop_feature",
    "scene_tensor",
]


BOX_MODES = ("obj", "crop", "crop_native", "scene")


def _normalized(img: Any, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """PIL RGB image -> (3, H, W) float32, ``(x / 255 - mean) / std``."""
    import numpy as np

    x = torch.from_numpy(np.array(img, dtype=np.float32, copy=True)).permute(2, 0, 1).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


def scene_tensor(img: Any, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The whole image resized (bicubic) to ``size x size``, normalized: (3, size, size).

    No center crop (unlike :class:`ImageSettings`' k-NN view): every box stays in the view. Non-square images
    are stretched; :func:`boxes_to_view` maps boxes with the same per-axis factors.
    """
    from PIL import Image

    return _normalized(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), mean, std)


def _pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A box rounded outward to whole pixels and clipped to the image, at least 1 x 1 pixel."""
    import math

    x0 = min(max(int(math.floor(box[0])), 0), width - 1)
    y0 = min(max(int(math.floor(box[1])), 0), height - 1)
    x1 = max(min(int(math.ceil(box[2])), width), x0 + 1)
    y1 = max(min(int(math.ceil(box[3])), height), y0 + 1)
    return x0, y0, x1, y1


def crop_tensor(img: Any, box: Sequence[float], size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The box's pixels (``img.crop`` of the box rounded outward to whole pixels) resized (bicubic) to
    ``size x size``, normalized: (3, size, size). Only the box's pixels enter the resize filter."""
    from PIL import Image

    rgb = img.convert("RGB")
    crop = rgb.crop(_pixel_box(box, rgb.width, rgb.height))
    return _normalized(crop.resize((size, size), Image.Resampling.BICUBIC), mean, std)


def native_crop_tensor(img: Any, box: Sequence[float], size: int, mean: Sequence[float], std: Sequence[float]
                       ) -> Tensor:
    """The box's pixels (rounded outward, as :func:`crop_tensor`) at the scale the scene view shows them (the
    image resized to ``size x size``, as :func:`scene_tensor`), pasted centred on a black ``size x size``
    canvas, normalized: (3, size, size). The object keeps its apparent size in the scene instead of being
    upsampled to fill the view (ODIS's [OBJ] with a box mask against the [CLS] of the object at matched scale)."""
    from PIL import Image

    rgb = img.convert("RGB")
    x0, y0, x1, y1 = _pixel_box(box, rgb.width, rgb.height)
    crop = rgb.crop((x0, y0, x1, y1))
    w = min(size, max(1, round((x1 - x0) * size / rgb.width)))
    h = min(size, max(1, round((y1 - y0) * size / rgb.height)))
    if crop.size != (w, h):
        crop = crop.resize((w, h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size))  # black
    canvas.paste(crop, ((size - w) // 2, (size - h) // 2))
    return _normalized(canvas, mean, std)


def pixel_crop_feature(img: Any, box: Sequence[float], size: int = 28) -> Tensor:
    """The raw-pixel baseline of a box: its pixels (rounded outward, as :func:`crop_tensor`) in grayscale,
    resized (bicubic) to ``size x size``, scaled to [0, 1], the crop's own mean removed: (size * size,).

    Grayscale and the removed mean make the cosine blind to the object's tint, which carries no class; on
    the default scenes (``make-scenes``, 96 px) k-NN gets 66.6% this way, 61.3% uncentered, 64.1% / 57.9%
    in RGB: the strongest of the four is the bar."""
    import numpy as np
    from PIL import Image

    gray = img.convert("L")
    crop = gray.crop(_pixel_box(box, gray.width, gray.height)).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32).reshape(-1) / 255.0)
    return x - x.mean()


def boxes_to_view(boxes: Tensor, width: int, height: int, size: int) -> Tensor:
    """(N, 4) xyxy in image pixels -> the same boxes in the ``size x size`` view of :func:`scene_tensor`."""
    scale = torch.tensor([size / width, size / height, size / width, size / height], dtype=torch.float64)
    return boxes.to(torch.float64) * scale


class _BoxForward(nn.Module):
    """``forward(x, obj_mask, obj)``: the [OBJ] output with ``obj_mask`` when ``obj``, else the CLS output."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor, obj_mask: Tensor | None = None, obj: bool = False) -> Tensor:
        if obj:
            return self.backbone.forward_tokens(x, obj_mask=obj_mask)["obj"]
        return self.backbone(x)


@dataclass
class BoxFeatures:
    """One feature row per box, in the boxes file's image order, then box order."""

    features: dict[str, Tensor]  # mode -> (N, D) float32
    labels: Tensor  # (N,) int64 category id of each box (-1 where the file has none)
    image_index: Tensor  # (N,) int64 index into file_names
    boxes: Tensor  # (N, 4) float32 xyxy in image pixels
    file_names: list[str]  # images, relative to the image root
    meta: dict[str, Any] = field(default_factory=dict)  # image_size, precision, seconds per mode, counts


def extract_box_features(
    backbone: nn.Module,
    image_root: str | Path,
    boxes: Any = None,
    modes: Sequence[str] = BOX_MODES,
    settings: ImageSettings = ImageSettings(),
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    batch_size: int = 128,
) -> BoxFeatures:
    """Object-level features: one row per box of ``boxes`` for each mode.

    Modes (ODIS, Hızlı, Yıldız, Marttinen 2025, Sec. 4, k-NN "using masks at inference time"):

    - ``obj``: the [OBJ] output on the whole scene (the :func:`scene_tensor` view) with the box's patch
      mask, ``backbone.forward_tokens(x, obj_mask=...)["obj"]``; the box is mapped through the resize
      (:func:`boxes_to_view`) and a patch belongs to it if any of its pixels is inside
      (:func:`~ssl_distill.data.boxes.patch_mask_from_boxes`). The scene is repeated once per box, so a
      batch holds ``batch_size`` boxes. Needs a backbone with ``has_obj_token``;
    - ``crop``: the CLS output of the box crop (:func:`crop_tensor`, resized to the view size);
    - ``crop_native``: the CLS output of the box crop at the scene view's scale, centred on a black canvas
      (:func:`native_crop_tensor`);
    - ``scene``: the CLS output of the whole scene, repeated for each of its boxes.

    Args:
        backbone: a frozen :class:`~ssl_distill.models.TokenBackbone` (eval mode is set here).
        image_root: the folder the boxes file's ``file_name`` entries are relative to.
        boxes: a boxes file path or a :class:`~ssl_distill.data.boxes.BoxesFile`; None: every image of
            ``image_root`` (any depth) is one whole-image box, and ``obj`` is the [OBJ] output attending to
            every patch (no mask). Images of the file without boxes give no rows.
        modes: subset of :data:`BOX_MODES`.
        settings: ``image_size`` (the view side; a multiple of the patch size), ``mean`` and ``std``;
            ``resize_size`` is not used (no center crop).
        precision: ``fp32``, ``bf16`` or ``fp16`` as :func:`prepare_inference`.
        batch_size: rows per forward pass.
    """
    modes = _checked_modes(backbone, modes, settings, batch_size)
    root = Path(image_root).expanduser().resolve()
    names, per_image, source = _boxed_images(root, boxes)
    device = torch.device(device)
    model, amp = prepare_inference(_BoxForward(backbone), precision, device)
    size, patch = int(settings.image_size), int(getattr(backbone, "patch_size", 1))
    mean, std = tuple(settings.mean), tuple(settings.std)
    feats: dict[str, list[Tensor]] = {m: [] for m in modes}
    seconds = {m: 0.0 for m in modes}
    all_boxes, all_labels, all_index = [], [], []
    was_training = backbone.training
    backbone.eval()
    t_load = 0.0
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            for first in range(0, len(names), batch_size):
                t0 = time.perf_counter()
                views = _load_views(root, names, per_image, range(first, min(first + batch_size, len(names))),
                                    modes, size, patch, mean, std)
                t_load += time.perf_counter() - t0
                all_boxes += views.boxes
                all_labels += views.labels
                all_index += views.index
                for mode in modes:
                    t0 = time.perf_counter()
                    feats[mode].append(_forward_mode(model, views, mode, batch_size, device))
                    seconds[mode] += time.perf_counter() - t0
    finally:
        backbone.train(was_training)
    empty = torch.zeros(0, dtype=torch.long)
    meta = {"image_root": str(root), "boxes": source, "images": len(names),
            "boxes_count": sum(len(b) for b in all_boxes), "image_size": size, "precision": precision,
            "modes": list(modes), "seconds": seconds, "seconds_load": t_load, "device": str(device)}
    return BoxFeatures(
        features={m: torch.cat(v) if v else torch.zeros(0, 0) for m, v in feats.items()},
        labels=torch.cat(all_labels) if all_labels else empty,
        image_index=torch.cat(all_index) if all_index else empty,
        boxes=torch.cat(all_boxes).float() if all_boxes else torch.zeros(0, 4),
        file_names=list(names), meta=meta)


def _checked_modes(backbone: nn.Module, modes: Sequence[str], settings: ImageSettings,
                   batch_size: int) -> tuple[str, ...]:
    """``modes`` without repeats, once the request is known to be valid (ValueError naming what is not)."""
    modes = tuple(dict.fromkeys(modes))
    bad = [m for m in modes if m not in BOX_MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {BOX_MODES}, got {list(modes)}")
    if "obj" in modes and not getattr(backbone, "has_obj_token", False):
        raise ValueError("mode 'obj' needs a backbone with an [OBJ] token (an ODIS model); this one has none")
    settings.check_fits(backbone)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return modes


#: per image: its boxes (K, 4) xyxy and their category ids (K,), or (None, None) for one whole-image box
_ImageBoxes = tuple[Any, Any]


def _boxed_images(root: Path, boxes: Any) -> tuple[list[str], list[_ImageBoxes], str | None]:
    """(image names, their boxes, the boxes file's path): the images of ``boxes`` that have any, or every
    image below ``root`` with one whole-image box when ``boxes`` is None (path None)."""
    from ssl_distill.data.boxes import BoxesFile, read_boxes
    from ssl_distill.data.folder import scan_image_folder

    if boxes is None:
        names = scan_image_folder(root, labeled=False).paths
        return names, [(None, None) for _ in names], None
    bf = boxes if isinstance(boxes, BoxesFile) else read_boxes(boxes, root)
    names, per_image = [], []
    for name in bf.boxes:
        xyxy, cats = bf.boxes_for(name)
        if len(xyxy):
            names.append(name)
            per_image.append((xyxy, cats))
    return names, per_image, str(getattr(bf, "path", boxes))


@dataclass
class _Views:
    """What the model sees of a few images: their scene views (S, 3, size, size) and the scene row of each
    of their B boxes (B,); the boxes' crop views (3, size, size) per crop mode and (h * w,) patch masks where
    those modes run; and per image, its boxes (K, 4) float32, their labels (K,) and the image's index (K,)."""

    scenes: Tensor
    row: Tensor
    crops: dict[str, list[Tensor]]
    masks: list[Tensor]
    boxes: list[Tensor]
    labels: list[Tensor]
    index: list[Tensor]


def _load_views(root: Path, names: list[str], per_image: list[_ImageBoxes], indices: range, modes: Sequence[str],
                size: int, patch: int, mean: tuple[float, ...], std: tuple[float, ...]) -> _Views:
    """The :class:`_Views` of images ``indices`` of ``names``."""
    from ssl_distill.data.boxes import patch_mask_from_boxes
    from ssl_distill.data.folder import decoded_image

    scenes, rows, masks, all_boxes, labels, index = [], [], [], [], [], []
    crop_views = {"crop": crop_tensor, "crop_native": native_crop_tensor}
    crops: dict[str, list[Tensor]] = {m: [] for m in crop_views if m in modes}
    for i in indices:
        img = decoded_image(root / names[i], UNREADABLE_HINT)
        w, h = img.size
        xyxy, cats = per_image[i]
        whole = xyxy is None
        if whole:
            xyxy = torch.tensor([[0.0, 0.0, float(w), float(h)]])
            cats = torch.tensor([-1])
        else:
            xyxy, cats = torch.as_tensor(xyxy, dtype=torch.float32), torch.as_tensor(cats)
        scenes.append(scene_tensor(img, size, mean, std))
        rows += [len(scenes) - 1] * len(xyxy)
        all_boxes.append(xyxy)
        labels.append(cats.long())
        index.append(torch.full((len(xyxy),), i, dtype=torch.long))
        for mode, view in crop_views.items():
            if mode in modes:
                crops[mode] += [view(img, b.tolist(), size, mean, std) for b in xyxy]
        if "obj" in modes and not whole:
            masks.append(patch_mask_from_boxes(boxes_to_view(xyxy, w, h, size), size, size, patch))
    return _Views(torch.stack(scenes), torch.tensor(rows, dtype=torch.long), crops, masks, all_boxes, labels, index)


def _forward_mode(model: nn.Module, views: _Views, mode: str, batch_size: int, device: torch.device) -> Tensor:
    """(B, D) float32 features of the views' boxes in ``mode`` (the :class:`_BoxForward` ``model``)."""
    if mode == "scene":
        return _forward(model, views.scenes, None, False, batch_size, device)[views.row]
    if mode in views.crops:
        return _forward(model, torch.stack(views.crops[mode]), None, False, batch_size, device)
    obj_mask = torch.cat(views.masks) if views.masks else None  # none: whole images, [OBJ] attends everywhere
    return _forward(model, views.scenes[views.row], obj_mask, True, batch_size, device)


def _forward(model: nn.Module, x: Tensor, obj_mask: Tensor | None, obj: bool, batch_size: int,
             device: torch.device) -> Tensor:
    """``model(x, obj_mask, obj)`` in batches of ``batch_size`` rows on ``device``, float32 on the CPU."""
    outs = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        mb = None if obj_mask is None else obj_mask[start : start + batch_size].to(device)
        outs.append(model(xb, mb, obj).float().cpu())
    return torch.cat(outs)
