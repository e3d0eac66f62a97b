"""CorLoc: the fraction of images whose predicted box has IoU >= 0.5 with some ground-truth box.

The single-object discovery measure of Deselaers et al. (ECCV 2010), used by LOST and TokenCut.

Box convention: ``[x0, y0, x1, y1]`` in continuous pixel-edge coordinates (a box covering pixel
columns 3..9 has ``x0 = 3, x1 = 10``), areas ``(x1 - x0) * (y1 - y0)``. Readers convert:

- Pascal VOC ``<bndbox>`` holds 1-based inclusive pixel indices: ``[xmin - 1, ymin - 1, xmax, ymax]``
  (so ``xmin = 1, xmax = W`` covers the whole width, as in LOST's reader);
- COCO ``bbox`` is ``[x, y, w, h]``: ``[x, y, x + w, y + h]``.

Ground truth is keyed by the image path relative to the image folder (``JPEGImages/`` for VOC,
the ``file_name`` of COCO's ``images`` entries), the same key the discovery boxes file uses.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import numpy as np

from ssl_distill.cli_args import corloc_arguments as add_arguments  # options: torch-free
from ssl_distill.cli_args import tool_main
from ssl_distill.errors import AnnotationError  # defined without torch, for the command line; re-exported here

__all__ = [
    "AnnotationError",
    "CorLocResult",
    "GroundTruth",
    "add_arguments",
    "box_iou",
    "corloc",
    "read_boxes_json",
    "read_coco",
    "read_voc",
]


@dataclass
class GroundTruth:
    """Boxes of one image: ``boxes`` (K, 4) float64 ``[x0, y0, x1, y1]``; ``difficult`` (K,) bool."""

    file_name: str
    boxes: np.ndarray
    difficult: np.ndarray
    width: int | None = None
    height: int | None = None


def box_iou(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of boxes ``a`` (N, 4) (or one box (4,)) with boxes ``b`` (M, 4): (N, M) (or (M,))."""
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    single = a_arr.ndim == 1
    a_arr = a_arr.reshape(-1, 4)
    x0 = np.maximum(a_arr[:, None, 0], b_arr[None, :, 0])
    y0 = np.maximum(a_arr[:, None, 1], b_arr[None, :, 1])
    x1 = np.minimum(a_arr[:, None, 2], b_arr[None, :, 2])
    y1 = np.minimum(a_arr[:, None, 3], b_arr[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = np.clip(a_arr[:, 2] - a_arr[:, 0], 0, None) * np.clip(a_arr[:, 3] - a_arr[:, 1], 0, None)
    area_b = np.clip(b_arr[:, 2] - b_arr[:, 0], 0, None) * np.clip(b_arr[:, 3] - b_arr[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return iou[0] if single else iou


def _text(node: ET.Element, path: str, file: Path) -> str:
    found = node.find(path)
    if found is None or found.text is None:
        raise AnnotationError(f"{file}: missing <{path}>")
    return found.text.strip()


def _number(node: ET.Element, path: str, file: Path) -> float:
    """The number in ``node``'s ``<path>``, or an AnnotationError naming the file and the tag."""
    text = _text(node, path, file)
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(f"{file}: <{path}> holds {text!r}, not a number") from None


def read_voc_xml(xml_path: str | Path) -> GroundTruth:
    """One Pascal VOC annotation file -> GroundTruth (file_name from ``<filename>``)."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise AnnotationError(f"cannot read VOC annotation {xml_path}: {e}") from e
    boxes, difficult = [], []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise AnnotationError(f"{xml_path}: an <object> without <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bb, k, xml_path) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        diff = obj.find("difficult")
        difficult.append(diff is not None and (diff.text or "0").strip() == "1")
    size = root.find("size")
    width = int(_number(size, "width", xml_path)) if size is not None else None
    height = int(_number(size, "height", xml_path)) if size is not None else None
    return GroundTruth(file_name=_text(root, "filename", xml_path), boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                       difficult=np.asarray(difficult, dtype=bool), width=width, height=height)


def read_voc(root: str | Path, split: str | None = "trainval") -> dict[str, GroundTruth]:
    """Ground truth of a Pascal VOC folder (``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/``).

    ``split`` names ``ImageSets/Main/<split>.txt`` (image ids, one a line); None reads every
    ``Annotations/*.xml``. Keys are the image file names relative to ``JPEGImages/``.
    """
    root = Path(root)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise AnnotationError(f"{root} has no Annotations/ folder (expected the Pascal VOC layout)")
    if split is None:
        xmls = sorted(ann_dir.glob("*.xml"))
    else:
        list_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise AnnotationError(f"split file {list_file} not found")
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        xmls = [ann_dir / f"{i}.xml" for i in ids]
    out: dict[str, GroundTruth] = {}
    for x in xmls:
        gt = read_voc_xml(x)
        out[gt.file_name] = gt
    if not out:
        raise AnnotationError(f"no annotations found in {ann_dir}" + (f" for split {split!r}" if split else ""))
    return out


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AnnotationError(f"cannot read JSON {path}: {e}") from e


def read_coco(json_path: str | Path) -> dict[str, GroundTruth]:
    """Ground truth of a COCO-style JSON (``images`` with ``id`` / ``file_name``, ``annotations``
    with ``image_id`` / ``bbox`` [x, y, w, h]; ``iscrowd`` boxes are kept and marked difficult)."""
    path = Path(json_path)
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise AnnotationError(f"{path} is not COCO-style (needs 'images' and 'annotations')")
    by_id: dict[Any, tuple[str, list[list[float]], list[bool], dict[str, Any]]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise AnnotationError(f"{path}: images[{i}] needs an 'id' and a 'file_name'")
        by_id[img["id"]] = (img["file_name"], [], [], img)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or ann.get("image_id") not in by_id:
            raise AnnotationError(f"{path}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else None}) "
                                  f"refers to no listed image (image_id "
                                  f"{ann.get('image_id') if isinstance(ann, dict) else None})")
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(f"{path}: annotations[{i}] (id {ann.get('id')}) has bbox {ann.get('bbox')!r}; "
                                  "expected [x, y, width, height] in pixels") from None
        entry = by_id[ann["image_id"]]
        entry[1].append([x, y, x + w, y + h])
        entry[2].append(bool(ann.get("iscrowd", 0)))
    return {
        name: GroundTruth(name, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(diff, dtype=bool),
                          img.get("width"), img.get("height"))
        for name, boxes, diff, img in by_id.values()
    }


def read_boxes_json(json_path: str | Path) -> dict[str, np.ndarray]:
    """Predicted boxes from a COCO-style boxes file (as written by discovery): file_name -> (K, 4) xyxy."""
    return {name: gt.boxes for name, gt in read_coco(json_path).items()}


@dataclass
class CorLocResult:
    corloc: float  # fraction of evaluated images with a hit, in [0, 1]
    n_images: int
    n_hits: int
    hits: dict[str, bool]  # per image
    best_iou: dict[str, float]  # per image, IoU of the (first) predicted box with its best gt box
    missing: list[str]  # images with ground truth but no prediction (counted as misses)

    def as_dict(self) -> dict[str, Any]:
        return {"corloc": self.corloc, "n_images": self.n_images, "n_hits": self.n_hits,
                "missing": self.missing, "best_iou": self.best_iou}


def corloc(predictions: Mapping[str, np.ndarray | Sequence[float]], ground_truth: Mapping[str, GroundTruth],
           iou_threshold: float = 0.5, skip_difficult: bool = False) -> CorLocResult:
    """CorLoc of one predicted box per image against all ground-truth boxes of that image.

    ``predictions`` maps file names to one box (4,) or boxes (K, 4), of which the first is used.
    Every image in ``ground_truth`` that has at least one (kept) box is evaluated; an image without
    a prediction counts as a miss and is listed in ``missing``. With ``skip_difficult`` boxes marked
    difficult (VOC) / iscrowd (COCO) are ignored. ValueError for a threshold outside (0, 1];
    AnnotationError when no predicted file name is among the evaluated images (every one a miss: the names
    do not match, not the boxes).
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"the IoU threshold (--iou) must be in (0, 1], got {iou_threshold:g}")
    kept = {name: gt.boxes[~gt.difficult] if skip_difficult else gt.boxes for name, gt in ground_truth.items()}
    kept = {name: boxes for name, boxes in kept.items() if len(boxes)}
    _check_names(predictions, list(kept))
    hits: dict[str, bool] = {}
    best: dict[str, float] = {}
    missing: list[str] = []
    for name, boxes in kept.items():
        pred = predictions.get(name)
        if pred is None or len(np.asarray(pred).reshape(-1, 4)) == 0:
            missing.append(name)
            hits[name], best[name] = False, 0.0
            continue
        iou = box_iou(np.asarray(pred, dtype=np.float64).reshape(-1, 4)[0], boxes)
        best[name] = float(iou.max())
        hits[name] = bool(best[name] >= iou_threshold)
    n = len(hits)
    n_hits = sum(hits.values())
    return CorLocResult(corloc=n_hits / n if n else float("nan"), n_images=n, n_hits=n_hits,
                        hits=hits, best_iou=best, missing=missing)


def _check_names(predictions: Mapping[str, Any], evaluated: list[str]) -> None:
    """AnnotationError when images are to be evaluated and none of them has a predicted file name."""
    if not evaluated or not set(predictions).isdisjoint(evaluated):
        return
    if not predictions:
        raise AnnotationError(f"no predicted boxes to score against the {len(evaluated)} ground-truth images "
                              "(the boxes file lists no image)")
    raise AnnotationError(
        f"none of the {len(predictions)} predicted file names ({_first_names(predictions)}) is a ground-truth "
        f"image ({_first_names(evaluated)}): the boxes file's file_name must be the image path relative to the "
        "image folder of the ground truth (JPEGImages/ for VOC)")


def _first_names(names: Iterable[str]) -> str:
    """The first three of ``names`` in sorted order, quoted, then ``...`` if there are more."""
    names = sorted(names)
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")


def read_ground_truth(voc: str | None = None, coco: str | None = None, split: str | None = "trainval") -> dict[str, GroundTruth]:
    """Ground truth from a VOC folder or a COCO JSON (exactly one of them)."""
    if (voc is None) == (coco is None):
        raise AnnotationError("give exactly one of a VOC folder or a COCO JSON for the ground truth")
    return read_voc(voc, split) if voc is not None else read_coco(coco)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    gt = read_ground_truth(args.voc, args.coco, args.split)
    res = corloc(read_boxes_json(args.boxes), gt, args.iou, args.skip_difficult)
    if res.n_images == 0:
        raise AnnotationError(f"no ground-truth image has a box to evaluate ({len(gt)} images"
                              + (", every box marked difficult: leave out --skip-difficult)" if args.skip_difficult
                                 else " without boxes)"))
    print(f"CorLoc {100 * res.corloc:.2f}% ({res.n_hits}/{res.n_images} images"
          + (f", {len(res.missing)} without a prediction" if res.missing else "") + ")")
    return 0


main = tool_main("corloc", add_arguments, run)  # python -m ssl_distill.eval.corloc


if __name__ == "__main__":
    raise SystemExit(main())
