"""k-NN evaluation of frozen features: extract both sets and vote (:mod:`ssl_distill.weighted_knn`, DINO's
protocol).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ssl_distill.models.frozen_features import extract_features
from ssl_distill.weighted_knn import knn_classify

__all__ = ["run_knn"]


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
    train_feats, train_labels = extract_features(backbone, train_loader, device, amp_dtype, out_dtype=feature_dtype)
    val_feats, val_labels = extract_features(backbone, val_loader, device, amp_dtype, out_dtype=feature_dtype)
    t1 = time.perf_counter()
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    results: dict[str, Any] = dict(
        knn_classify(train_feats, train_labels, val_feats, val_labels, ks=ks, temperature=temperature,
                     num_classes=num_classes, engine=engine, train_chunk=train_chunk)
    )
    t2 = time.perf_counter()
    results.update(
        n_train=int(train_feats.shape[0]),
        n_val=int(val_feats.shape[0]),
        dim=int(train_feats.shape[1]),
        num_classes=num_classes,
        ks=[int(k) for k in ks],
        temperature=float(temperature) if isinstance(temperature, (int, float)) else [float(t) for t in temperature],
        engine=engine,
        seconds_extract=t1 - t0,
        seconds_search=t2 - t1,
    )
    return results
