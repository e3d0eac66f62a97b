"""Patch masks for masked image modeling, drawn with the batch (iBOT, Zhou et al. ICLR 2022).

iBOT's student sees its global views with some patch tokens replaced by a mask token and predicts
the teacher's patch distributions there (Sec. 3.2, Eq. 2: ``L_MIM = -sum_i m_i P_t(u_i)^T log
P_s(u^_i)``). The masks ``m`` come from the data loader (``ImageFolderMask`` in iBOT's loader.py):

- per global view, a ratio ``r``: one entry of ``pred_ratio`` chosen uniformly, then uniform in
  ``pred_ratio[i] +- pred_ratio_var[i]`` (iBOT's ``get_pred_ratio``); ``r = 0`` before
  ``pred_start_epoch``;
- ``block``: BEiT's block-wise masking (Bao et al. 2022, Algorithm 1; :class:`MaskingGenerator`)
  aiming at ``r * h * w`` patches, with iBOT's settings: smallest block target
  ``(min(h, w) // 3) ** 2`` patches, no largest-block cap, aspect ratio log-uniform in (0.3, 1/0.3);
- ``random``: exactly ``int(r * h * w)`` patches, uniformly.

Reproducibility: every number is drawn from :func:`ssl_distill.data.rng.counter_uniforms` of
the sample seed (itself a function of (run seed, epoch, dataset index)), on streams of their own
(``Stream.MASK_RATIO`` and ``Stream.MASK_SHAPE``, apart from the crops'), so a sample's masks do not
depend on the batch, rank or number of workers, and turning masks on leaves the crops bit-identical.

Deviations from iBOT's loader (distributions unchanged): iBOT draws a ratio for every list entry
and then picks one, here the entry is picked first and only its ratio is drawn; ``random.randint(a,
b)`` is ``a + int(u * (b - a + 1))`` on a counter-based uniform; masks are made for global views
only (iBOT also makes masks for the local views and never uses them).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ssl_distill.config import MaskingConfig
from ssl_distill.data.rng import Stream, counter_uniforms, uniform_stream

BLOCK_TRIES = 10  # attempts per block (BEiT's MaskingGenerator._mask)
_FIRST_UNIFORMS = 64  # uniforms drawn per (sample, view) up front for the block masks; more on demand


def ibot_min_block_patches(height: int, width: int) -> int:
    """iBOT's smallest block target in patches: ``(min(h, w) // 3) ** 2`` (16 on a 14 x 14 grid)."""
    return (min(height, width) // 3) ** 2


class MaskingGenerator:
    """Block-wise masking on an ``height x width`` patch grid (BEiT, Bao et al. 2022, Algorithm 1).

    Blocks are added until ``num_masking_patches`` is reached or a block adds nothing: a block
    targets ``s ~ U(min_num_patches, budget)`` patches (``budget``: what is left, capped by
    ``max_num_patches``) with aspect ratio ``a = h / w`` log-uniform in ``(min_aspect,
    max_aspect)``, ``h = round(sqrt(s a))``, ``w = round(sqrt(s / a))``, strictly smaller than the
    grid, at a uniform position; it is kept when it adds between 1 and ``budget`` new patches, else
    retried, :data:`BLOCK_TRIES` times at most. So the count never exceeds ``num_masking_patches``
    and may stop short of it.

    Randomness comes from ``draw()`` (a uniform in [0, 1) per call), read in the official order:
    area, aspect, then top and left when the block fits. ``uniform(a, b) = a + (b - a) u`` (as
    Python's ``random.uniform``), ``randint(0, n) = int(u (n + 1))``.
    """

    def __init__(self, height: int, width: int, min_num_patches: int | None = None,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None) -> None:
        self.height, self.width = int(height), int(width)
        self.min_num_patches = ibot_min_block_patches(height, width) if min_num_patches is None else min_num_patches
        self.max_num_patches = max_num_patches  # None: the remaining budget only (iBOT)
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def block(self, mask: np.ndarray, max_mask_patches: float, draw: Callable[[], float]) -> int:
        """Add one block to ``mask`` (bool (height, width), in place); returns the patches it added (0: none fit).

        With less than one patch of budget no try can succeed (a block adds a whole number of
        patches): 0 at once, without reading the draws the tries would have read and discarded.
        """
        if max_mask_patches < 1:
            return 0
        lo, (log_lo, log_hi) = self.min_num_patches, self.log_aspect
        for _ in range(BLOCK_TRIES):
            target_area = lo + (max_mask_patches - lo) * draw()
            aspect = math.exp(log_lo + (log_hi - log_lo) * draw())
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(draw() * (self.height - h + 1))
                left = int(draw() * (self.width - w + 1))
                region = mask[top : top + h, left : left + w]
                delta = h * w - int(np.count_nonzero(region))
                if 0 < delta <= max_mask_patches:
                    region[...] = True
                    return delta
        return 0

    def __call__(self, num_masking_patches: float, draw: Callable[[], float]) -> np.ndarray:
        """bool (height, width), True = masked, at most ``num_masking_patches`` (a float, as iBOT's ``r * h * w``)."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = num_masking_patches - count
            if self.max_num_patches is not None:
                budget = min(budget, self.max_num_patches)
            delta = self.block(mask, budget, draw)
            if delta == 0:
                break
            count += delta
        return mask


def random_masks(u: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exactly ``counts[b]`` masked positions per row, uniformly (iBOT's ``pred_shape='rand'``).

    Args:
        u: (B, N) uniforms; the ``counts[b]`` smallest of row b are masked.
        counts: (B,) ints in [0, N].

    Returns:
        bool (B, N).
    """
    rank = np.argsort(np.argsort(u, axis=1, kind="stable"), axis=1, kind="stable")
    return rank < np.asarray(counts).reshape(-1, 1)


class BatchMasking:
    """Masks of the global views of a batch: ``(seeds, epochs) -> list of n_global bool (B, h * w)``.

    Row-major over the ``h x w`` patch grid of a global view (``h = w = global_size // patch_size``),
    True = masked. Sample b, view g depends only on ``(seeds[b], epochs[b], g)``.
    """

    def __init__(self, masking: MaskingConfig, grid: int | tuple[int, int], n_global: int) -> None:
        if masking.shape not in ("block", "random"):
            raise ValueError(f"masking.shape must be block or random to draw masks, got {masking.shape!r}")
        self.cfg = masking
        self.height, self.width = (grid, grid) if isinstance(grid, int) else grid
        self.n_global = int(n_global)
        self.ratios_ = np.asarray(masking.pred_ratio, dtype=np.float64)
        var = masking.pred_ratio_var
        self.vars_ = np.asarray(var * len(self.ratios_) if len(var) == 1 else var, dtype=np.float64)
        self.generator = MaskingGenerator(self.height, self.width, masking.min_block_patches,
                                          masking.max_block_patches, *masking.pred_aspect_ratio)

    def ratios(self, seeds: Sequence[int], epochs: Sequence[float] | None = None) -> np.ndarray:
        """float64 (B, n_global): each view's ratio (iBOT's ``get_pred_ratio``); 0 before ``pred_start_epoch``."""
        u = counter_uniforms(seeds, Stream.MASK_RATIO, range(self.n_global), 2)  # (B, G, 2)
        pick = np.minimum((u[..., 0] * len(self.ratios_)).astype(np.int64), len(self.ratios_) - 1)
        mean, var = self.ratios_[pick], self.vars_[pick]
        lo, hi = mean - var, mean + var
        ratio = np.where(var > 0, lo + (hi - lo) * u[..., 1], mean)
        if self.cfg.pred_start_epoch > 0:
            if epochs is None:
                raise ValueError("masking.pred_start_epoch > 0 needs each sample's epoch "
                                 "(EpochSampler(..., with_epoch=True) puts it in the samples)")
            before = np.asarray(epochs, dtype=np.float64).reshape(-1, 1) < self.cfg.pred_start_epoch
            ratio = np.where(before, 0.0, ratio)
        return ratio

    def __call__(self, seeds: Sequence[int], epochs: Sequence[float] | None = None) -> list[torch.Tensor]:
        seeds = [int(s) for s in seeds]
        high = self.ratios(seeds, epochs) * self.height * self.width  # iBOT: get_pred_ratio() * H * W
        n = self.height * self.width
        out = []
        for g in range(self.n_global):
            if self.cfg.shape == "random":
                u = counter_uniforms(seeds, Stream.MASK_SHAPE, g, n)
                masks = random_masks(u, high[:, g].astype(np.int64))
            else:
                first = counter_uniforms(seeds, Stream.MASK_SHAPE, g, _FIRST_UNIFORMS)
                masks = np.stack([
                    self.generator(float(high[b, g]), uniform_stream(s, Stream.MASK_SHAPE, g, first[b])).reshape(n)
                    for b, s in enumerate(seeds)])
            out.append(torch.from_numpy(masks))
        return out


def build_masking(masking: MaskingConfig, global_size: int, patch_size: int, n_global: int) -> BatchMasking | None:
    """The batch masks of a config, or None for ``masking.shape == "none"`` (DINO)."""
    if masking.shape == "none":
        return None
    return BatchMasking(masking, int(global_size) // int(patch_size), n_global)


def true_positions(masks: torch.Tensor) -> torch.Tensor:
    """(M,) int64: the flat positions of the True entries of ``masks`` (any shape), row-major, in the order
    a boolean index takes them. For the step's masks this runs on the host copy (the loader's masks,
    AttMask's from the copied attention), where counting the True entries costs no wait for a GPU."""
    return masks.reshape(-1).nonzero().squeeze(1)
