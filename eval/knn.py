"""k-NN evaluation of frozen features (DINO's protocol, :mod:`ssl_distill.weighted_knn`): ``ssl-distill knn``
of a checkpoint or run directory (:func:`knn_on_checkpoint`), and both sets of a pair of loaders (:func:`run_knn`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl_distill.config import Config, ConfigError, KnnConfig, apply_overrides, config_from_dict, config_to_dict
from ssl_distill.data.folder import require_folder
from ssl_distill.eval_constants import untrained_cls_note
from ssl_distill.models.frozen_features import FeatureExtractor, FeatureSpec, extract_features
from ssl_distill.runtime import resolve_device
from ssl_distill.weighted_knn import knn_classify

from .features import FeatureSet, ImageSettings, extract_train_val
from .model import load_model
from .results import default_output, write_results

__all__ = ["knn_on_checkpoint", "run_knn"]


def knn_on_checkpoint(
    checkpoint: str | Path,
    train_dir: str | None = None,
    val_dir: str | None = None,
    which: str = "teacher",
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    random_init: bool = False,
    device: str = "auto",
    precision: str | None = None,
    *,
    key: str | None = None,
    num_heads: int | None = None,
    features: FeatureSpec | None = None,
    temperatures: Sequence[float] | None = None,
    feature_dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    train_chunk: int | None = None,
    boxes: str | Path | None = None,
) -> dict[str, Any]:
    """Weighted k-NN of the frozen backbone of ``checkpoint`` (run directory, our file or an official one).

    Image settings, k values and temperature come from the run's ``knn`` config section (official files:
    224 / 256 px, ImageNet normalization), updated by ``knn.*`` overrides; ``train_dir`` / ``val_dir``
    replace the configured folders. ``precision`` of the feature extraction: ``fp32`` (DINO's
    eval_knn.py), ``bf16`` (about 2x faster on CPU) or ``fp16`` (CUDA); None (default) takes
    ``knn.precision``, itself fp32 unless the run or a ``knn.precision=`` override sets it. With
    ``random_init`` the same architecture is evaluated with freshly initialised weights (seeded,
    :func:`~ssl_distill.eval.model.load_model`).
    Writes ``out`` (default ``<run dir>/knn[_random_init].json``) and returns the results (the
    precision used under ``precision``), whose ``accuracy`` entry maps ``k=..`` (and ``k=..,T=..``
    for extra temperatures) to top-1 / top-5 percentages; ``details`` holds per-class accuracy; ``notes`` says
    which ``k`` exceeded the train set (those vote with all of it). DataError (before any feature is extracted)
    when the folders' classes differ or there is only one.

    Keyword-only extras: ``key`` / ``num_heads`` (see :func:`ssl_distill.checkpoints.load_any_backbone`),
    ``features`` (layout, default CLS of the last block), ``temperatures`` (several from one search; the
    first replaces ``knn.temperature``), ``feature_dtype`` (``torch.float16`` halves memory),
    ``cache_dir`` (re-use features while checkpoint and data are unchanged), ``train_chunk`` (bounded
    search memory), ``boxes`` (the ``obj`` layout: a COCO boxes file name in each folder, e.g. ``boxes.json``;
    each image's [OBJ] reads the patches of its boxes, :func:`~ssl_distill.eval.features.view_box_masks`).
    """
    spec = features or FeatureSpec()
    model = load_model(checkpoint, which, key=key, random_init=random_init, num_heads=num_heads,
                       obj_token=spec.layout == "obj")
    loaded = model.loaded
    if (note := untrained_cls_note(loaded.config, spec.name())) and not random_init:
        print(f"warning: {note}")
    knn = _knn_settings(loaded.config, overrides or [], train_dir, val_dir, precision)
    temps = [float(t) for t in temperatures] if temperatures else [float(knn.temperature)]
    sets = extract_train_val(
        FeatureExtractor(model.backbone, spec), knn.train_dir, knn.val_dir,
        ImageSettings(knn.image_size, knn.resize_size, *model.normalization), cache_dir=cache_dir,
        device=resolve_device(device, key="device"), precision=knn.precision, batch_size=knn.batch_size,
        num_workers=knn.num_workers, dtype=feature_dtype, boxes=boxes)
    classes = sets[0].classes
    res = _classify(*sets, knn.ks, temps, len(classes), train_chunk)
    results = {
        "checkpoint": str(loaded.file),
        "which": "random_init" if random_init else loaded.source,
        "format": loaded.format,
        "train_dir": knn.train_dir,
        "val_dir": knn.val_dir,
        "classes": classes,
        "image_size": knn.image_size,
        "resize_size": knn.resize_size,
        "features": spec.name(),
        **({} if boxes is None else {"boxes": str(boxes), "images_reading_every_patch": {
            split: fs.meta.get("images_reading_every_patch") for split, fs in zip(("train", "val"), sets)}}),
        "precision": knn.precision,
        "feature_dtype": str(feature_dtype).replace("torch.", ""),
        "accuracy": {k: {"top1": v["top1"], "top5": v["top5"]} for k, v in res.items() if k.startswith("k=")},
        "per_class": {k: v["per_class"] for k, v in res.items() if k.startswith("k=")},
        "details": res,
        "notes": _clipped_ks(knn.ks, res["n_train"]),
    }
    if out is None:
        out = default_output(checkpoint, "knn", random_init)
    write_results(results, Path(out))
    results["out"] = str(out)
    return results


def _knn_settings(cfg: Config, overrides: list[str], train_dir: str | None, val_dir: str | None,
                  precision: str | None) -> KnnConfig:
    """The run's ``knn`` section with the ``knn.*`` overrides, then the folders and precision given (if any)."""
    for o in overrides:
        if not o.startswith("knn."):
            raise ConfigError(f"evaluation overrides must be knn.* keys, got {o!r}")
    knn = config_from_dict(apply_overrides(config_to_dict(cfg), overrides)).knn
    knn = dataclasses.replace(knn, train_dir=train_dir or knn.train_dir, val_dir=val_dir or knn.val_dir,
                              precision=precision or knn.precision)
    if not knn.train_dir or not knn.val_dir:
        raise ConfigError("k-NN needs labeled train and val folders: pass --train and --val (or set knn.train_dir/val_dir)")
    for split, given in (("train", train_dir), ("val", val_dir)):  # a folder of the run's config may be gone
        folder, key = getattr(knn, f"{split}_dir"), f"knn.{split}_dir"
        overridden = any(o.startswith(key + "=") for o in overrides)
        named = f"--{split} {folder}" if given else f"{key}={folder}{'' if overridden else ' (from the run config)'}"
        require_folder(folder, named, f"pass --{split} with a labeled folder (<class>/<image>)")
    return knn


def _clipped_ks(ks: Sequence[int], n_train: int) -> list[str]:
    """The note when some ``k`` of ``ks`` exceeds the train set (:func:`knn_classify` votes with all of it)."""
    over = [int(k) for k in ks if k > n_train]
    if not over:
        return []
    names = [f"k={k}" for k in over]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return [f"the train folder has {n_train} images: {listed} used all {n_train} of them "
            f"(those entries are a k={n_train} vote); pick ks up to {n_train} with knn.ks=[...]"]


def _classify(train: FeatureSet, val: FeatureSet, ks: Sequence[int], temps: list[float], num_classes: int,
              train_chunk: int | None) -> dict[str, Any]:
    """The results' ``details``: :func:`_knn_with_counts` of the val folder against the train folder, then the
    search engine, the extraction seconds and which of the two feature sets came from the cache."""
    res = _knn_with_counts((train.features, train.labels), (val.features, val.labels), ks,
                           temps if len(temps) > 1 else temps[0], num_classes, train_chunk=train_chunk)
    res.update(engine="chunked" if train_chunk else "faiss",
               seconds_extract=sum(s.meta.get("seconds", 0.0) for s in (train, val) if not s.cached),
               features_cached=[train.cached, val.cached])
    return res


def run_knn(
    backbone: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    ks: Sequence[int],
    temperature: float | Sequence[float],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    engine: str = "faiss",
    feature_dtype: torch.dtype = torch.float32,
    train_chunk: int | None = None,
) -> dict[str, Any]:
    """Extract frozen features of both sets and run :func:`knn_classify`.

    ``backbone`` is any module mapping images to (B, D) features (e.g. a ``FeatureExtractor``);
    ``feature_dtype=torch.float16`` halves the stored features, ``train_chunk`` bounds the search memory.
    Returns the :func:`knn_classify` entries (``"k=10"`` ...) plus ``n_train``, ``n_val``, ``dim``,
    ``num_classes``, ``ks``, ``temperature``, ``engine``, ``seconds_extract`` and ``seconds_search``.
    """
    t0 = time.perf_counter()
    train = extract_features(backbone, train_loader, device, amp_dtype, out_dtype=feature_dtype)
    val = extract_features(backbone, val_loader, device, amp_dtype, out_dtype=feature_dtype)
    t1 = time.perf_counter()
    num_classes = int(max(train[1].max(), val[1].max())) + 1
    results = _knn_with_counts(train, val, ks, temperature, num_classes, engine=engine, train_chunk=train_chunk)
    results.update(engine=engine, seconds_extract=t1 - t0, seconds_search=time.perf_counter() - t1)
    return results


def _knn_with_counts(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], ks: Sequence[int],
          temperature: float | Sequence[float], num_classes: int, **search: Any) -> dict[str, Any]:
    """:func:`knn_classify` of ``val`` against ``train`` ((N, D) features, (N,) labels each), its entries
    followed by ``n_train``, ``n_val``, ``dim``, ``num_classes``, ``ks`` and ``temperature``; ``search``:
    ``engine`` / ``train_chunk``."""
    (train_x, train_y), (val_x, val_y) = train, val
    results: dict[str, Any] = dict(knn_classify(train_x, train_y, val_x, val_y, ks=ks, temperature=temperature,
                                                num_classes=num_classes, **search))
    results.update(
        n_train=int(train_x.shape[0]),
        n_val=int(val_x.shape[0]),
        dim=int(train_x.shape[1]),
        num_classes=num_classes,
        ks=[int(k) for k in ks],
        temperature=float(temperature) if isinstance(temperature, (int, float)) else [float(t) for t in temperature],
    )
    return results
