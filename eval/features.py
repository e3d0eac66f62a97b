"""Features of a frozen backbone over a labeled image folder, with the cache all evaluations share (one feature
per box: :mod:`ssl_distill.eval.box_features`). The layouts, the precision and the extraction loop are
:mod:`ssl_distill.models.frozen_features`'s.

:func:`extract_folder` runs a backbone over a labeled image folder (``EvalTransform``: resize the
shorter side, center crop, normalize) in fp32 by default, as DINO's evaluations (``bf16`` is the fast
option, see :func:`~ssl_distill.models.frozen_features.prepare_inference`), and caches the result on disk,
keyed by a hash of the weights, the feature layout, the image settings, the precision and the folder's
file list (names, labels, sizes, modification times): a changed checkpoint or data set extracts again,
an unchanged one is read back. With ``boxes`` (the ``obj`` layout), ODIS's [OBJ] token of each image reads
the patches of the view its boxes touch (:func:`view_box_masks`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ssl_distill.errors import DataError
from ssl_distill.models.frozen_features import FeatureExtractor, amp_dtype_for, extract_features, prepare_inference

if TYPE_CHECKING:
    from ssl_distill.data.folder import FileList

__all__ = [
    "ImageSettings",
    "FeatureSet",
    "backbone_fingerprint",
    "folder_fingerprint",
    "check_same_classes",
    "extract_folder",
    "extract_train_val",
    "view_box_masks",
]


# ----------------------------------------------------------------------------------------------------
# Extraction settings, fingerprints, cache
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSettings:
    """Evaluation view: resize the shorter side to ``resize_size`` (bicubic), center crop ``image_size``."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def check_fits(self, backbone: nn.Module) -> None:
        """ValueError unless the crop is a whole number of the backbone's patches (timm's patch embedding
        asserts it; the official DINOv3 model would drop the remainder without a word)."""
        p = int(getattr(backbone, "patch_size", 1))
        if self.image_size < p or self.image_size % p:
            raise ValueError(f"the evaluation crop of {self.image_size} px is not a multiple of the model's "
                             f"{p} px patches: give an image size that is (knn.image_size=... for knn, "
                             f"--image-size for linear and object-knn), e.g. {max(p, self.image_size // p * p)}")




def backbone_fingerprint(model: nn.Module) -> str:
    """Hash of a module's weights (names, dtypes, shapes and bytes) and its backbone spec, if any."""
    h = hashlib.blake2b(digest_size=16)
    spec = getattr(model, "spec", None)
    if dataclasses.is_dataclass(spec):
        h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def folder_fingerprint(files: FileList) -> str:
    """Hash of a :class:`~ssl_distill.data.folder.FileList`: root, relative paths, labels, sizes and mtimes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(files.root).encode())
    h.update(json.dumps(list(files.classes)).encode())
    for rel, label in zip(files.paths, files.labels):
        try:
            st = os.stat(files.root / rel)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{rel}|{label}|{stamp}\n".encode())
    return h.hexdigest()


@dataclass
class FeatureSet:
    """Features of one labeled folder."""

    features: Tensor  # (N, F), float32 or float16, dataset order
    labels: Tensor  # (N,) int64
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # settings, key, seconds, images/s, cached
    cached: bool = False


def view_box_masks(files: FileList, boxes: str | Path, settings: ImageSettings, patch_size: int) -> tuple[Tensor, int]:
    """Which patches of each image's evaluation view its boxes touch: (N, P) bool, and how many images read
    every patch instead.

    ``boxes``: a COCO boxes file (``make-scenes`` / ``discover`` write them; :func:`boxes_file` resolves a name
    relative to ``files.root``). The boxes go through the view's resize and centre crop (:meth:`EvalTransform.boxes_to_view`); an
    image's row is the union of its boxes' patches
    (:func:`~ssl_distill.data.boxes.patch_mask_from_boxes`), or every patch (the all-patch ``obj`` read-out)
    for an image without a box or whose boxes all fall outside the crop: those are counted.
    """
    from ssl_distill.data.boxes import patch_mask_from_boxes, read_boxes
    from ssl_distill.data.eval_transform import EvalTransform
    from ssl_distill.data.folder import image_size

    found = read_boxes(boxes_file(files, boxes), files.root, paths=files.paths)
    view, size = EvalTransform(settings.image_size, settings.resize_size), settings.image_size
    masks = torch.ones(len(files), (size // patch_size) ** 2, dtype=torch.bool)
    every_patch = 0
    for i, rel in enumerate(files.paths):
        xyxy, _ = found.boxes_for(rel)
        row = None
        if len(xyxy):
            try:
                width, height = image_size(files.abspath(i))
            except DataError:  # the extraction substitutes it and counts it against max_bad_fraction
                width = height = None
            if width is not None:
                boxes_in_view = view.boxes_to_view(torch.from_numpy(xyxy), width, height)
                row = patch_mask_from_boxes(boxes_in_view, size, size, patch_size).any(0)
        if row is None or not row.any():
            every_patch += 1
        else:
            masks[i] = row
    return masks, every_patch


def boxes_file(files: FileList, boxes: str | Path) -> Path:
    """A boxes file given by name: relative to the folder of ``files`` unless absolute; AnnotationError if absent."""
    from ssl_distill.errors import AnnotationError

    path = Path(boxes)
    path = path if path.is_absolute() else files.root / path
    if not path.is_file():
        raise AnnotationError(f"boxes file {path} does not exist (--boxes names a COCO file inside each evaluated "
                              "folder, e.g. boxes.json as make-scenes writes it)")
    return path


class _WithMasks:
    """Iterates a loader, adding each batch's rows of ``masks`` (N, P) as ``obj_mask``."""

    def __init__(self, loader: Any, masks: Tensor) -> None:
        self.loader, self.dataset, self.masks = loader, loader.dataset, masks

    def __iter__(self):  # noqa: ANN204
        for batch in self.loader:
            yield {**batch, "obj_mask": self.masks[torch.as_tensor(batch["index"], dtype=torch.long)]}

    def __len__(self) -> int:
        return len(self.loader)


class _CountBad:
    """Iterates a loader and sums the batches' ``bad`` (substituted unreadable images) counts."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.dataset, self.bad = loader, loader.dataset, 0

    def __iter__(self):  # noqa: ANN204
        for batch in self.loader:
            self.bad += int(batch.get("bad", 0))
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def check_same_classes(train: list[str], val: list[str]) -> None:
    """DataError unless a train and a val folder have the same classes, at least two of them (with one class
    every image is classified right, whatever the features)."""
    if train != val:
        raise DataError(f"train and val folders have different classes: {sorted(set(train) ^ set(val))}")
    if len(train) < 2:
        raise DataError(f"the train and val folders have one class ({train[0]!r}): an accuracy needs at least two "
                        "class subfolders (root/<class>/<image>)")


def extract_folder(
    extractor: FeatureExtractor,
    folder: str | Path | FileList,
    settings: ImageSettings = ImageSettings(),
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    batch_size: int = 128,
    num_workers: int = 2,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    weights_key: str | None = None,
    max_bad_fraction: float = 0.01,
    boxes: str | Path | None = None,
) -> FeatureSet:
    """Features of every image of a labeled folder, from the disk cache when nothing changed.

    Args:
        extractor: backbone + layout; put on ``device`` here.
        folder: ``root/<class>/<image>``, or its :class:`~ssl_distill.data.folder.FileList` when already scanned.
        precision: ``fp32`` (default, as DINO's eval_knn / eval_linear), ``bf16`` (CPU: a bfloat16 copy of
            the model, about 2x faster; CUDA: autocast) or ``fp16`` (CUDA autocast). Part of the cache key.
        dtype: storage dtype of the features: ``torch.float32`` or ``torch.float16``.
        cache_dir: where ``<folder name>-<key>.pt`` files live; None disables caching.
        weights_key: fingerprint of the weights if already known (default: hashed here).
        max_bad_fraction: above this share of unreadable (substituted) images, raise DataError.
        boxes: a COCO boxes file of the folder (relative to it unless absolute) for the ``obj`` layout: each
            image's [OBJ] reads the patches its boxes touch (:func:`view_box_masks`; the file's size and time
            are part of the cache key, ``meta["images_reading_every_patch"]`` counts images without a box).
    """
    from ssl_distill.checkpoints import atomic_save
    from ssl_distill.data.folder import FileList, scan_image_folder

    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"feature dtype must be float32 or float16, got {dtype}")
    device = torch.device(device)
    amp_dtype_for(precision, device)  # validates before any work
    settings.check_fits(extractor.backbone)
    if boxes is not None and extractor.spec.layout != "obj":
        raise ValueError(f"boxes select the patches ODIS's [OBJ] token reads: give the obj layout (--layout obj), "
                         f"not {extractor.spec.layout!r}")
    files = folder if isinstance(folder, FileList) else scan_image_folder(folder, labeled=True)
    meta: dict[str, Any] = {
        "folder": str(files.root), "n": len(files), "layout": extractor.spec.layout,
        "n_last_blocks": extractor.spec.n_last_blocks, "image": dataclasses.asdict(settings),
        "precision": precision, "dtype": str(dtype).replace("torch.", ""),
    }
    if boxes is not None:  # the file's identity keys the cache; its masks are only needed to extract
        path = boxes_file(files, boxes)
        stat = path.stat()
        meta["boxes"] = {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = None
    if cache_dir is not None:
        cache_file = _cache_file(Path(cache_dir), files, meta, weights_key or backbone_fingerprint(extractor.backbone))
        cached = _read_cache(cache_file, files, dtype, meta)
        if cached is not None:
            return cached
    masks = None
    if boxes is not None:
        masks, meta["images_reading_every_patch"] = view_box_masks(
            files, boxes, settings, int(getattr(extractor.backbone, "patch_size", 1)))
    feats, labels, run = _extract_files(extractor, files, settings, device, precision, batch_size, num_workers, dtype,
                                        max_bad_fraction, masks)
    meta.update(run)
    if cache_file is not None:
        atomic_save({"features": feats, "labels": labels, "meta": meta}, cache_file)
        meta["cache_file"] = str(cache_file)
    return FeatureSet(feats, labels, list(files.classes), meta, cached=False)


def _cache_file(cache_dir: Path, files: FileList, meta: dict[str, Any], weights: str) -> Path:
    """``<cache_dir>/<folder name>-<key>.pt``, the key a hash of ``meta`` (layout, view, precision, dtype),
    the weights' fingerprint and the folder's; sets ``meta["key"]``."""
    key_src = dict(meta, weights=weights, data=folder_fingerprint(files), version=1)
    key = hashlib.blake2b(json.dumps(key_src, sort_keys=True).encode(), digest_size=12).hexdigest()
    meta["key"] = key
    return cache_dir / f"{files.root.name}-{key}.pt"


def _read_cache(cache_file: Path, files: FileList, dtype: torch.dtype, meta: dict[str, Any]) -> FeatureSet | None:
    """The cached features of ``files`` when ``cache_file`` is there, readable and fits (row count, dtype)."""
    if not cache_file.is_file():
        return None
    try:
        obj = torch.load(cache_file, map_location="cpu", weights_only=True)
        feats, labels = obj["features"], obj["labels"]
        if feats.shape[0] == len(files) and feats.dtype == dtype:
            return FeatureSet(feats, labels, list(files.classes),
                              dict(obj.get("meta", meta), cache_file=str(cache_file)), cached=True)
    except Exception as e:  # a damaged cache file: extract again
        warnings.warn(f"ignoring unreadable feature cache {cache_file}: {e}", stacklevel=3)
    return None


def _extract_files(extractor: FeatureExtractor, files: FileList, settings: ImageSettings, device: torch.device,
                   precision: str, batch_size: int, num_workers: int, dtype: torch.dtype,
                   max_bad_fraction: float, masks: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(N, F) features and (N,) labels of ``files`` in folder order (image i's [OBJ] reading ``masks[i]`` when
    given), and the pass's seconds, images/s, count of unreadable (substituted) images and device; DataError
    above ``max_bad_fraction`` unreadable images."""
    from ssl_distill.data.folder import EVAL_ADVICE, BadImageCounter
    from ssl_distill.data.loader import build_eval_loader

    loader = build_eval_loader(files.root, settings.image_size, settings.resize_size, batch_size, num_workers,
                               tuple(settings.mean), tuple(settings.std))
    counting = _CountBad(loader)
    model, amp = prepare_inference(extractor, precision, device)
    t0 = time.perf_counter()
    feats, labels = extract_features(model, counting if masks is None else _WithMasks(counting, masks), device, amp,
                                     out_dtype=dtype)
    seconds = time.perf_counter() - t0
    counter = BadImageCounter(max_bad_fraction, advice=EVAL_ADVICE)
    counter.update(counting.bad, len(files))
    try:
        counter.finalize()
    except DataError as e:
        raise DataError(f"{files.root}: {e}") from e
    return feats, labels, {"seconds": seconds, "images_per_s": len(files) / max(seconds, 1e-9),
                           "bad_images": counting.bad, "device": str(device)}


def extract_train_val(extractor: FeatureExtractor, train_dir: str | Path, val_dir: str | Path,
                      settings: ImageSettings, *, cache_dir: str | Path | None = None,
                      **options: Any) -> tuple[FeatureSet, FeatureSet]:
    """:func:`extract_folder` of a train and a val folder (the weights hashed once for both cache keys);
    ``options`` as its (device, precision, batch_size, num_workers, dtype). DataError before any feature is
    extracted or cached unless the two folders have the same classes (:func:`check_same_classes`)."""
    from ssl_distill.data.folder import scan_image_folder

    files = [scan_image_folder(d, labeled=True) for d in (train_dir, val_dir)]
    check_same_classes(files[0].classes, files[1].classes)
    weights = backbone_fingerprint(extractor.backbone) if cache_dir is not None else None
    train, val = (extract_folder(extractor, f, settings, cache_dir=cache_dir, weights_key=weights, **options)
                  for f in files)
    return train, val
