"""k-NN evaluation of frozen features: extract both sets and vote (:mod:`ssl_distill.weighted_knn`, DINO's
protocol), and the results files every evaluation writes.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssl_distill.models.frozen_features import extract_features
from ssl_distill.weighted_knn import knn_classify

__all__ = ["default_output", "run_knn", "write_results"]


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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def default_output(checkpoint: str | Path, name: str, random_init: bool = False) -> Path:
    """``<run dir>/<name>.json`` (``<name>_random_init.json`` for random weights): where an evaluation of
    ``checkpoint`` (a run directory or a checkpoint file in one) writes its results by default."""
    ck = Path(checkpoint)
    return (ck if ck.is_dir() else ck.parent) / f"{name}{'_random_init' if random_init else ''}.json"


def write_results(results: dict, path: Path) -> None:
    """Write ``results`` as JSON atomically: a temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=_json_default)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
