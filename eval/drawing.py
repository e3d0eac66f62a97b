"""Drawing helpers shared by the figures of ``visualize`` and ``discover``: colour maps, nearest upsampling
of token maps to pixels, mask overlays, and the attention masks of DINO's figures (:func:`threshold_mass`,
also the mask DINO-seg boxes).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["blend", "colorize", "head_colors", "overlay_mask", "threshold_mass", "upsample"]


def threshold_mass(maps: Tensor | np.ndarray, fraction: float) -> np.ndarray:
    """Per map, the smallest set of patches holding at least ``fraction`` of its mass, as a bool mask.

    ``maps`` (..., h, w), non-negative. Patches are taken in decreasing weight until the kept sum
    reaches ``fraction`` of the map's total (DINO's rule: sort, cumulate, keep ``cum > 1 - t``).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {fraction}")
    a = torch.as_tensor(np.asarray(maps), dtype=torch.float64)
    lead, (h, w) = a.shape[:-2], a.shape[-2:]
    flat = a.reshape(-1, h * w)
    flat = flat / flat.sum(dim=-1, keepdim=True)
    val, idx = torch.sort(flat, dim=-1)  # ascending
    cum = torch.cumsum(val, dim=-1)
    # a hair above 1 - t so that rounding in the cumulative sum never adds an unneeded patch
    keep_sorted = cum > (1.0 - fraction) + 1e-12
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, idx, keep_sorted)
    return keep.reshape(*lead, h, w).numpy()


def upsample(m: np.ndarray, patch_size: int) -> np.ndarray:
    """A token map (h, w[, c]) -> pixel map (h p, w p[, c]) by nearest upsampling (one block per patch)."""
    return np.repeat(np.repeat(m, patch_size, axis=0), patch_size, axis=1)


def colorize(m: np.ndarray, cmap: str = "inferno", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 through a matplotlib colour map (min-max scaled by default)."""
    import matplotlib

    m = np.asarray(m, dtype=np.float64)
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    norm = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    rgba = matplotlib.colormaps[cmap](np.clip(norm, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def head_colors(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8), from matplotlib's tab10 / tab20."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return (np.asarray([cmap(i % cmap.N)[:3] for i in range(n)]) * 255).round().astype(np.uint8)


def _edges(mask: np.ndarray) -> np.ndarray:
    pad = np.pad(mask, 1, mode="edge")
    inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return mask & ~inner


def overlay_mask(image: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float = 0.5,
                 width: int = 1) -> np.ndarray:
    """Tint the (H, W) ``mask`` pixels of ``image`` with ``color`` and draw its outline in full colour,
    ``width`` pixels wide (inside the mask)."""
    out = image.astype(np.float32).copy()
    c = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * c
    inner = mask
    for _ in range(width):
        edge = _edges(inner)
        out[edge] = c
        inner = inner & ~edge
    return out.round().astype(np.uint8)


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """(H, W, 3) uint8 ``image`` and ``heat`` -> their mix, ``alpha`` of the heat map."""
    return ((1 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)).round().astype(np.uint8)
