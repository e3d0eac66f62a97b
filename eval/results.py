"""Where an evaluation's results go: ``<run dir>/<name>.json`` (or a folder ``<run dir>/<name>``) by default,
written atomically as JSON (tensors, numpy values, paths, dtypes and devices as plain values).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssl_distill.atomic import atomic_write

__all__ = ["default_output", "write_results"]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def default_output(checkpoint: str | Path, name: str, random_init: bool = False, suffix: str = ".json") -> Path:
    """``<run dir>/<name>.json`` (``<name>_random_init.json`` for random weights): where an evaluation of
    ``checkpoint`` (a run directory or a checkpoint file in one) writes its results by default; ``suffix=""``
    names an output folder."""
    ck = Path(checkpoint)
    return (ck if ck.is_dir() else ck.parent) / f"{name}{'_random_init' if random_init else ''}{suffix}"


def write_results(results: dict, path: Path) -> None:
    """Write ``results`` as JSON atomically (:func:`ssl_distill.atomic.atomic_write`)."""
    text = json.dumps(results, indent=2, default=_json_default)
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n")
