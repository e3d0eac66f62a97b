"""Object boxes for object-level self-distillation (ODIS, Hızlı, Yıldız and Marttinen 2025, arXiv 2506.05409).

A boxes file is COCO-style JSON::

    {"images": [{"id": 1, "file_name": "a/b.png", "width": 640, "height": 480}, ...],   # width/height optional
     "annotations": [{"image_id": 1, "bbox": [x, y, w, h], "category_id": 3}, ...],       # category_id optional
     "categories": [{"id": 3, "name": "cat"}, ...]}                                      # optional

``file_name`` is relative to the training folder; ``bbox`` is in pixels, ``[x, y]`` the top-left
corner (continuous pixel-edge coordinates: a box covering the whole image is ``[0, 0, W, H]``).
``ssl-distill discover`` writes exactly this (``eval/discover.py``, ``write_coco_boxes``), so an
ODIS run trains on labeled boxes or on boxes from our own label-free discovery alike.

Checks (:func:`read_boxes`), each with a message naming the first few offenders and their count:

- an image the file names that is not in the folder: :class:`~ssl_distill.errors.AnnotationError`
  (the file belongs to another folder, or the folder changed);
- a box reaching more than ``tolerance`` (1) pixel beyond its image: clipped to the image, with a
  :class:`BoxesWarning` counting them (within the tolerance: clipped without a word, rounding);
- a box entirely outside its image, or with non-positive width or height: dropped, with a
  :class:`BoxesWarning` counting them.

Nothing is dropped without being counted: :attr:`BoxesFile.report` holds every count for the
training log. Images of the folder that the file does not name, or names without boxes, are
allowed: they get plain crops and no object term.

Image sizes come from the file's ``width`` / ``height`` when both are given (COCO's convention:
they are trusted), otherwise from the image header. Object-aware cropping clips the boxes to the
decoded image again, so a stale size can never place a box outside the pixels.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import AnnotationError

__all__ = ["BoxesFile", "BoxesWarning", "patch_mask_from_boxes", "read_boxes"]

_LISTED = 5  # offenders named in a message


class BoxesWarning(UserWarning):
    """Boxes of a boxes file were clipped or dropped (the message counts and names them)."""


def patch_mask_from_boxes(boxes: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Which patches of a ``height x width`` view each box touches.

    Patch ``(i, j)`` of the row-major ``(height // p) x (width // p)`` grid covers pixels
    ``[j p, (j + 1) p) x [i p, (i + 1) p)`` and belongs to box ``(x0, y0, x1, y1)`` iff their
    intersection has positive area: ``x0 < (j + 1) p and x1 > j p and y0 < (i + 1) p and y1 > i p``
    (ODIS: a patch belongs to the object if any of its pixels is inside the box). A box edge on a
    patch border therefore does not reach into the next patch. A box of zero area gives an
    all-False row. Pixels beyond the last whole patch (sizes not a multiple of ``p``) are ignored.

    Args:
        boxes: (N, 4) xyxy in the view's pixel coordinates (any real dtype).
        height, width: the view's size in pixels.
        patch_size: p.

    Returns:
        bool (N, (height // p) * (width // p)), on ``boxes.device``.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4) xyxy, got shape {tuple(boxes.shape)}")
    if patch_size < 1 or height < 0 or width < 0:
        raise ValueError(f"need patch_size >= 1 and a non-negative size, got patch_size={patch_size}, "
                         f"height={height}, width={width}")
    b = boxes if boxes.is_floating_point() else boxes.to(torch.float64)
    x0, y0, x1, y1 = b.unbind(-1)  # (N,) each
    p = int(patch_size)
    cols = torch.arange(width // p, device=b.device, dtype=b.dtype) * p  # left edges
    rows = torch.arange(height // p, device=b.device, dtype=b.dtype) * p  # top edges
    in_cols = (x0[:, None] < cols + p) & (x1[:, None] > cols)  # (N, gw)
    in_rows = (y0[:, None] < rows + p) & (y1[:, None] > rows)  # (N, gh)
    in_rows &= ((x1 > x0) & (y1 > y0))[:, None]
    return (in_rows[:, :, None] & in_cols[:, None, :]).reshape(len(b), len(rows) * len(cols))


@dataclass
class BoxesFile:
    """The boxes of a folder's images, validated (see :func:`read_boxes`).

    Attributes:
        path: the JSON file.
        image_root: the folder ``file_name`` is relative to.
        boxes: relative posix path -> (float32 (n, 4) xyxy in image pixels, int64 (n,) category ids,
            -1 where absent); images the file names without (kept) boxes map to n = 0.
        categories: category id -> name (from the optional ``categories`` list).
        report: counts for the log: ``images`` (named by the file), ``images_with_boxes``, ``boxes``
            (kept), ``boxes_clipped`` (kept, clipped by more than the tolerance), ``boxes_outside`` and
            ``boxes_degenerate`` (dropped: entirely outside / non-positive width or height), and with
            the folder's list, ``folder_images`` and ``folder_images_without_boxes``.
    """

    path: Path
    image_root: Path
    boxes: dict[str, tuple[np.ndarray, np.ndarray]]
    categories: dict[int, str] = field(default_factory=dict)
    report: dict[str, int] = field(default_factory=dict)

    def boxes_for(self, relpath: str) -> tuple[np.ndarray, np.ndarray]:
        """(float32 (n, 4) xyxy, int64 (n,) category ids) of one image; n = 0 when it has none."""
        found = self.boxes.get(_normalize(relpath))
        if found is None:
            return np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        return found

    def __len__(self) -> int:
        return len(self.boxes)

    def summary(self) -> str:
        """One line for the log, e.g. ``boxes.json: 1200 boxes on 1000 of 1100 images; 3 clipped, 2 dropped``."""
        r = self.report
        images = f" of {r['folder_images']} folder images" if "folder_images" in r else " images"
        return (f"{self.path.name}: {r['boxes']} boxes on {r['images_with_boxes']}{images} "
                f"({r['images']} named); {r['boxes_clipped']} clipped to their image, "
                f"{r['boxes_outside'] + r['boxes_degenerate']} dropped ({r['boxes_outside']} outside their image, "
                f"{r['boxes_degenerate']} with non-positive width or height)")


def _normalize(name: str) -> str:
    """A relative posix path without ``./`` or duplicate separators."""
    return posixpath.normpath(str(name).replace(os.sep, "/")).lstrip("/") if name else ""


def _listed(items: Sequence[str]) -> str:
    return ", ".join(items[:_LISTED]) + (", ..." if len(items) > _LISTED else "")


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnnotationError(f"boxes file {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise AnnotationError(f"cannot read boxes file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise AnnotationError(f"boxes file {path} is not COCO-style: it needs lists 'images' and 'annotations'")
    return data


def _relative(name: Any, root: Path, path: Path, index: int) -> str:
    if not isinstance(name, str) or not name:
        raise AnnotationError(f"boxes file {path}: images[{index}] has no 'file_name' string")
    if os.path.isabs(name):
        try:
            name = Path(name).resolve().relative_to(root).as_posix()
        except ValueError:
            pass  # outside the folder: reported as missing
    return _normalize(name)


def _declared_size(entry: dict[str, Any], path: Path, name: str) -> tuple[float, float] | None:
    """(width, height) of an ``images`` entry; None when it gives neither; an error unless both are positive."""
    w, h = entry.get("width"), entry.get("height")
    if w is None and h is None:
        return None
    if isinstance(w, bool) or isinstance(h, bool) or not isinstance(w, (int, float)) \
            or not isinstance(h, (int, float)) or not (w > 0 and h > 0):
        raise AnnotationError(f"boxes file {path}: image {name} has width={w!r}, height={h!r}; "
                              "both must be positive numbers (or leave both out)")
    return float(w), float(h)


def _header_size(file: Path) -> tuple[float, float] | None:
    """(width, height) from the image header; None when it is unreadable."""
    try:
        with Image.open(file) as img:
            return float(img.width), float(img.height)
    except (OSError, SyntaxError, ValueError):
        return None


def _bbox(ann: Any, path: Path, index: int) -> tuple[Any, list[float], int]:
    """(image_id, [x, y, w, h], category id or -1) of one annotation, or an error naming it."""
    if not isinstance(ann, dict) or "image_id" not in ann:
        raise AnnotationError(f"boxes file {path}: annotations[{index}] has no 'image_id'")
    bbox = ann.get("bbox")
    ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    if not ok:
        raise AnnotationError(f"boxes file {path}: annotations[{index}] (id {ann.get('id')!r}) has bbox {bbox!r}; "
                              "expected 4 finite numbers [x, y, width, height]")
    cat = ann.get("category_id", -1)
    if isinstance(cat, bool) or not isinstance(cat, int):
        raise AnnotationError(f"boxes file {path}: annotations[{index}] has category_id {cat!r}, expected an integer")
    return ann["image_id"], [float(v) for v in bbox], cat


def read_boxes(path: str | os.PathLike[str], image_root: str | os.PathLike[str], *,
               paths: Sequence[str] | None = None, tolerance: float = 1.0) -> BoxesFile:
    """Read and validate a COCO-style boxes file for the images under ``image_root``.

    Args:
        path: the JSON file (see the module docstring for the format).
        image_root: the folder ``file_name`` is relative to.
        paths: the folder's images (``FileList.paths``); membership is checked against them and the
            report counts the folder's images without boxes. Without it, each named file must exist.
        tolerance: pixels a box may reach beyond its image before it counts as clipped.

    Returns:
        a :class:`BoxesFile`; clipped and dropped boxes are announced with one :class:`BoxesWarning`
        per kind, and counted in ``report``.

    Raises:
        AnnotationError: unreadable or malformed file, duplicate image ids or names, annotations of
            unknown images, or images that are not in the folder (message names them and counts them).
    """
    path, root = Path(path), Path(image_root).expanduser().resolve()
    data = _load(path)
    known = None if paths is None else {_normalize(p) for p in paths}
    by_id: dict[Any, str] = {}
    sizes: dict[str, tuple[float, float] | None] = {}  # name -> declared (width, height), in file order
    missing: list[str] = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise AnnotationError(f"boxes file {path}: images[{i}] has no 'id'")
        name = _relative(img.get("file_name"), root, path, i)
        if img["id"] in by_id:
            raise AnnotationError(f"boxes file {path}: image id {img['id']!r} appears twice "
                                  f"({by_id[img['id']]} and {name})")
        if name in sizes:
            raise AnnotationError(f"boxes file {path}: image {name} appears twice in 'images'; give each image once, "
                                  "with all its boxes as annotations")
        by_id[img["id"]] = name
        sizes[name] = _declared_size(img, path, name)
        present = name in known if known is not None else (root / name).is_file()
        if not present:
            missing.append(name)
    if missing:
        raise AnnotationError(f"boxes file {path} names {len(missing)} of its {len(sizes)} images that are not in "
                              f"{root}: {_listed(missing)} (file_name must be relative to that folder)")

    raw: dict[str, list[tuple[list[float], int, int]]] = {name: [] for name in sizes}
    for i, ann in enumerate(data["annotations"]):
        image_id, bbox, cat = _bbox(ann, path, i)
        if image_id not in by_id:
            raise AnnotationError(f"boxes file {path}: annotations[{i}] refers to image_id {image_id!r}, "
                                  "which 'images' does not list")
        raw[by_id[image_id]].append((bbox, cat, i))

    boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    clipped: list[str] = []
    outside: list[str] = []
    degenerate: list[str] = []
    unsized: list[str] = []
    for name, anns in raw.items():
        size = sizes[name] if sizes[name] is not None or not anns else _header_size(root / name)
        if anns and size is None:
            unsized.append(name)
        kept_xyxy, kept_cat = [], []
        for (x, y, w, h), cat, i in anns:
            where = f"{name} (annotations[{i}])"
            if not (w > 0 and h > 0):
                degenerate.append(where)
                continue
            x0, y0, x1, y1 = x, y, x + w, y + h
            if size is not None:
                iw, ih = size
                beyond = x0 < -tolerance or y0 < -tolerance or x1 > iw + tolerance or y1 > ih + tolerance
                x0, x1 = min(max(x0, 0.0), iw), min(max(x1, 0.0), iw)
                y0, y1 = min(max(y0, 0.0), ih), min(max(y1, 0.0), ih)
                if not (x1 > x0 and y1 > y0):
                    outside.append(where)
                    continue
                if beyond:
                    clipped.append(where)
            kept_xyxy.append((x0, y0, x1, y1))
            kept_cat.append(cat)
        boxes[name] = (np.asarray(kept_xyxy, dtype=np.float32).reshape(-1, 4), np.asarray(kept_cat, dtype=np.int64))

    if clipped:
        warnings.warn(f"boxes file {path}: {len(clipped)} boxes reach more than {tolerance:g} pixel beyond their "
                      f"image and were clipped to it: {_listed(clipped)}", BoxesWarning, stacklevel=2)
    if outside:
        warnings.warn(f"boxes file {path}: {len(outside)} boxes lie entirely outside their image and were dropped: "
                      f"{_listed(outside)}", BoxesWarning, stacklevel=2)
    if degenerate:
        warnings.warn(f"boxes file {path}: {len(degenerate)} boxes have non-positive width or height and were "
                      f"dropped: {_listed(degenerate)}", BoxesWarning, stacklevel=2)
    if unsized:
        warnings.warn(f"boxes file {path}: {len(unsized)} images have no width/height in the file and an unreadable "
                      f"header, so their boxes are clipped only when the image is loaded: {_listed(unsized)}",
                      BoxesWarning, stacklevel=2)
    categories = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and isinstance(c.get("id"), int):
            categories[int(c["id"])] = str(c.get("name", c["id"]))
    report = {
        "images": len(sizes),
        "images_with_boxes": sum(len(b) > 0 for b, _ in boxes.values()),
        "boxes": sum(len(b) for b, _ in boxes.values()),
        "boxes_clipped": len(clipped),
        "boxes_outside": len(outside),
        "boxes_degenerate": len(degenerate),
    }
    if known is not None:
        report["folder_images"] = len(known)
        report["folder_images_without_boxes"] = len(known) - report["images_with_boxes"]
    return BoxesFile(path=path, image_root=root, boxes=boxes, categories=categories, report=report)
