"""DINO's photometric augmentation on stacked views: color jitter, grayscale, blur, solarize, normalize.

The ops run batched, in place on float (B, 3, H, W) tensors in [0, 1], each sample with its own
parameters: :class:`PhotometricAugment` draws them from ``Stream.PHOTOMETRIC`` of the sample seeds
(:mod:`ssl_distill.data.rng`), so a sample's output depends only on its crops and seed. The views
(which ones get blur, solarize) are those of :func:`ssl_distill.data.views.view_specs`.

Where we differ from DINO's PIL pipeline (intentionally, all small): the ops run on float images
without re-quantizing to uint8 between ops; contrast uses the exact (unrounded) mean luma; the blur
is a true separable Gaussian truncated at ``ceil(3 sigma)`` (PIL approximates it with three box
blurs).

:class:`GramCropAugment` treats Gram anchoring's teacher crops (DINOv3): normalised only, or with the
photometric parameters of their global view. DINOv3 distorts the larger crop once and resizes it to
both sizes; here each crop is distorted at its own size with the same parameters, the blur's sigma
scaled by ``gram_size / global_size`` so it covers the same part of the image.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssl_distill.config import CropsConfig
from ssl_distill.data.rng import Stream, counter_uniforms
from ssl_distill.data.tensors import new_batch_tensor
from ssl_distill.data.views import view_specs

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's convert("L") (ITU-R 601-2 luma)
_SOLARIZE_THRESHOLD = 0.5  # 128 on uint8


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with PIL's weights."""
    wr, wg, wb = _GRAY_WEIGHTS
    return (x[:, 0:1] * wr).add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: ``clamp(f * x)``. x: (B, 3, H, W) in [0, 1], factor: (B,) >= 0."""
    return x.mul_(_bcast(factor)).clamp_(0.0, 1.0)


def adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma: ``clamp(m + f (x - m))``. x: (B, 3, H, W), factor: (B,)."""
    mean = x.mean(dim=(2, 3)).mul_(x.new_tensor(_GRAY_WEIGHTS)).sum(dim=1)  # (B,)
    return x.mul_(_bcast(factor)).add_(_bcast(mean * (1.0 - factor))).clamp_(0.0, 1.0)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image: ``clamp(g + f (x - g))``. x: (B, 3, H, W), factor: (B,)."""
    return x.lerp_(_luma(x).expand_as(x), _bcast(1.0 - factor)).clamp_(0.0, 1.0)


def adjust_hue_(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns (|shift| <= 0.5), keeping HSV value and saturation.

    With ``M = max(r, g, b)``, chroma ``C = M - min(r, g, b)`` and hue ``h`` in sixths of a turn,
    channel ``c`` (hue centre ``2c``: R 0, G 2, B 4) equals ``M - C * clamp(d - 1, 0, 1)`` where
    ``d`` is the circular distance (period 6) from ``h`` to its centre. So only ``h`` is computed,
    shifted and mapped back; no full RGB -> HSV -> RGB round trip. Matches torchvision's
    ``adjust_hue`` on float tensors to ~1e-6.

    x: (B, 3, H, W) in [0, 1], modified in place; shift: (B,).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = chroma.clamp_min(1e-12).reciprocal_()  # gray pixels: numerator is 0, hue 0
    num = torch.where(r == maxc, g - b,
                      torch.where(g == maxc, (b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0)))
    hue = num.mul_(inv).add_(shift.view(-1, 1, 1) * 6.0)  # in [-4, 8] for |shift| <= 0.5
    for c, centre in enumerate((0.0, 2.0, 4.0)):
        a = (hue - centre).abs_() if centre else hue.abs()
        d = torch.minimum(a, torch.sub(6.0, a).abs_())  # circular distance, valid for a <= 9
        x[:, c] = torch.addcmul(maxc, chroma, d.sub_(1.0).clamp_(0.0, 1.0), value=-1.0)
    return x


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-sample 1-D Gaussian weights on ``[-radius, radius]``.

    Sample b gets ``exp(-t^2 / 2 sigma_b^2)`` for ``|t| <= ceil(3 sigma_b)`` and 0 beyond,
    normalized to sum 1 (PIL's ``GaussianBlur(radius=sigma)`` also reaches about 3 sigma).

    Args:
        sigma: (B,) standard deviations in pixels.
        radius: half-width of the common support, >= ``ceil(3 * sigma.max())``.

    Returns:
        float32 (B, 2 * radius + 1).
    """
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    sig = sigma.detach().to("cpu", torch.float64).view(-1, 1)
    kernel = torch.exp(-(t**2) / (2.0 * sig**2)) * (t.abs() <= torch.ceil(3.0 * sig))
    return (kernel / kernel.sum(dim=1, keepdim=True)).to(torch.float32)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, edges replicated (like PIL).

    Implemented as symmetric shifted multiply-adds (no convolution primitives, whose CPU set-up
    cost depends on the batch shape); each sample's result is exactly independent of the others.

    Args:
        x: (B, C, H, W) float.
        sigma: (B,) standard deviations in pixels, kernels from :func:`gaussian_kernels`.
        radius: common support half-width, >= ``ceil(3 * sigma.max())``.

    Returns:
        (B, C, H, W) blurred (a new tensor).
    """
    _, _, height, width = x.shape
    kernel = gaussian_kernels(sigma, radius).to(x.device)
    reach = int((kernel[:, radius + 1 :] > 0).sum(dim=1).max()) if radius else 0  # taps in use
    if reach == 0:
        return x.clone()
    r = reach
    w = [kernel[:, radius + i].view(-1, 1, 1, 1).to(x.dtype) for i in range(r + 1)]
    padded = F.pad(x, (r, r, r, r), mode="replicate")  # (B, C, H + 2r, W + 2r)
    rows = padded[..., r : r + width] * w[0]  # horizontal pass over all padded rows
    for i in range(1, r + 1):
        rows.addcmul_(padded[..., r - i : r - i + width] + padded[..., r + i : r + i + width], w[i])
    out = rows[:, :, r : r + height] * w[0]
    for i in range(1, r + 1):
        out.addcmul_(rows[:, :, r - i : r - i + height] + rows[:, :, r + i : r + i + height], w[i])
    return out


def solarize_(x: torch.Tensor) -> torch.Tensor:
    """Invert values >= 0.5 in place: ``x if x < 0.5 else 1 - x`` == ``0.5 - |x - 0.5|``."""
    return x.sub_(_SOLARIZE_THRESHOLD).abs_().neg_().add_(_SOLARIZE_THRESHOLD)


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal consecutive values: [(start, end, value)]."""
    if len(values) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    return [(int(s), int(e), int(values[s])) for s, e in zip(starts, ends)]


@dataclass
class _ViewParams:
    """Per-sample photometric parameters of one view (numpy, length B)."""

    jitter: np.ndarray  # bool
    factors: np.ndarray  # (B, 4) brightness, contrast, saturation factors, hue shift (turns)
    order: np.ndarray  # (B, 4) op indices (0 b, 1 c, 2 s, 3 h) in application order
    gray: np.ndarray  # bool
    blur: np.ndarray  # bool
    sigma: np.ndarray  # float
    solarize: np.ndarray  # bool

    def take(self, rows: np.ndarray | slice) -> "_ViewParams":
        return _ViewParams(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def blur_reach(self) -> np.ndarray:
        """Kernel half-width ``ceil(3 sigma)`` of blurred samples, 0 for the others (int64)."""
        return np.where(self.blur, np.ceil(3.0 * self.sigma), 0).astype(np.int64)

    def jitter_key(self) -> np.ndarray:
        """Op order as an int in [0, 256) for jittered samples, 256 for the others."""
        return np.where(self.jitter, self.order @ np.array([64, 16, 4, 1]), 256)


_JITTER_OPS = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)


class PhotometricAugment:
    """DINO's photometric ops + normalization on stacked views, with per-sample parameters.

    ``__call__(views, seeds)``: ``views`` is a list (globals first) of uint8 tensors (B, 3, s, s)
    on any device, ``seeds`` B sample seeds; returns float32 normalized tensors of the same shapes
    on the same device. Parameters for sample b of view v come from ``counter_uniforms(seeds[b],
    photometric stream, v)``, and every op is applied per sample, so a sample's output depends
    only on its crops and seed (not on the rest of the batch).

    How it is batched: the samples of a view are reordered so that blurred samples come first
    (sorted by kernel size) and samples sharing a jitter op order are adjacent, then processed in chunks of about
    ``chunk_elements`` values (cache-sized on CPU; the whole batch on GPU), each op running in place
    on contiguous slices of the chunk (or, when the slices would hold fewer than
    ``group_elements`` values, once per op position on the gathered samples). Results are written
    back in the original order. Every path applies the same arithmetic to each sample, so outputs
    are bit-identical whatever the batch, chunking or path.

    This is what :class:`~ssl_distill.data.collate.MultiCropCollate` runs in the data workers; an
    engine may instead build the collate with ``photometric=False`` and call this on the GPU.
    """

    _N_UNIFORMS = 13

    def __init__(self, crops: CropsConfig, chunk_elements: int = 1 << 20, group_elements: int = 1 << 16) -> None:
        self.crops = crops
        self.views = view_specs(crops)
        self.blur_radius = int(math.ceil(3.0 * float(crops.blur_sigma[1])))
        self.chunk_elements = int(chunk_elements)
        self.group_elements = int(group_elements)
        self.active_jitter = [i for i in range(4) if crops.jitter[i] > 0]  # torchvision skips zero-strength ops
        self.mean = torch.tensor(crops.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(crops.std, dtype=torch.float32).view(1, 3, 1, 1)

    def params(self, seeds: Sequence[int] | torch.Tensor, view: int) -> _ViewParams:
        """Draw the per-sample parameters of view ``view`` for the given seeds."""
        c, spec = self.crops, self.views[view]
        u = counter_uniforms(seeds, Stream.PHOTOMETRIC, view, self._N_UNIFORMS)
        factors = np.empty((u.shape[0], 4))
        for i in range(3):
            lo, hi = max(0.0, 1.0 - c.jitter[i]), 1.0 + c.jitter[i]
            factors[:, i] = lo + u[:, 1 + i] * (hi - lo)
        factors[:, 3] = c.jitter[3] * (2.0 * u[:, 4] - 1.0)
        return _ViewParams(
            jitter=u[:, 0] < c.jitter_p,
            factors=factors,
            order=np.argsort(u[:, 5:9], axis=1, kind="stable"),
            gray=u[:, 9] < c.grayscale_p,
            blur=u[:, 10] < spec.blur_p,
            sigma=c.blur_sigma[0] + u[:, 11] * (c.blur_sigma[1] - c.blur_sigma[0]),
            solarize=u[:, 12] < spec.solarize_p,
        )

    @staticmethod
    def _on_rows(x: torch.Tensor, rows: np.ndarray, fn: Callable[[torch.Tensor, np.ndarray], None]) -> None:
        """Run the in-place ``fn(x[rows], rows)``: on a slice when the rows are contiguous, else on a
        gathered copy that is scattered back (both are exact, so results never depend on which)."""
        if len(rows) == 0:
            return
        if rows[-1] - rows[0] + 1 == len(rows):
            fn(x[int(rows[0]) : int(rows[-1]) + 1], rows)
            return
        idx = torch.as_tensor(rows).to(x.device)
        xs = x.index_select(0, idx)
        fn(xs, rows)
        x.index_copy_(0, idx, xs)

    def _jitter_(self, x: torch.Tensor, p: _ViewParams) -> None:
        """Color jitter in place, each sample with its own factors and op order.

        Samples arrive sorted by op order. Large images: one call per op on each run of samples
        sharing an order. Small images (many tiny runs): one call per (position, op) on the samples
        having that op at that position, to keep the number of calls at 16.
        """
        if not self.active_jitter or not p.jitter.any():
            return
        factors = torch.as_tensor(p.factors, dtype=torch.float32).to(x.device)
        runs = [(s, e) for s, e, k in _runs(p.jitter_key()) if k != 256]
        per_run = int(p.jitter.sum()) * x[0].numel() / len(runs)
        if len(runs) <= 4 or per_run >= self.group_elements:
            for s, e in runs:
                for op in p.order[s].tolist():
                    if op in self.active_jitter:
                        _JITTER_OPS[op](x[s:e], factors[s:e, op])
            return
        for position in range(4):
            for op in self.active_jitter:
                rows = np.flatnonzero(p.jitter & (p.order[:, position] == op))
                self._on_rows(x, rows, lambda xs, r, op=op: _JITTER_OPS[op](xs, factors[torch.as_tensor(r), op]))

    def _chunk_(self, x: torch.Tensor, p: _ViewParams) -> None:
        """All photometric ops, in place on float (n, 3, H, W) in [0, 1], then normalization."""
        self._jitter_(x, p)
        self._on_rows(x, np.flatnonzero(p.gray), lambda xs, _: xs.copy_(_luma(xs).expand_as(xs)))
        for s, e, radius in _runs(p.blur_reach()):  # one call per kernel size
            if radius > 0:
                xs = x[s:e]
                xs.copy_(gaussian_blur(xs, torch.as_tensor(p.sigma[s:e]), self.blur_radius))
        self._on_rows(x, np.flatnonzero(p.solarize), lambda xs, _: solarize_(xs))
        x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def _one_view(self, u8: torch.Tensor, p: _ViewParams) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 normalized (B, 3, H, W)."""
        if u8.dtype != torch.uint8 or u8.dim() != 4 or u8.shape[1] != 3:
            raise ValueError(f"expected uint8 views (B, 3, H, W), got {u8.dtype} {tuple(u8.shape)}")
        if len(u8) != len(p.jitter):
            raise ValueError(f"{len(u8)} images but {len(p.jitter)} seeds")
        dev = u8.device
        # Blurred samples first, largest kernels first, then by jitter op order.
        order = np.argsort(np.where(p.blur, 0, 1 << 12) - (p.blur_reach() << 9) + p.jitter_key(), kind="stable")
        p = p.take(order)
        order_t = torch.as_tensor(order).to(dev)
        out = new_batch_tensor(u8.shape, torch.float32, dev)
        per_chunk = len(u8) if dev.type != "cpu" else max(1, self.chunk_elements // u8[0].numel())
        work = torch.empty((min(per_chunk, len(u8)), *u8.shape[1:]), dtype=torch.float32, device=dev)
        for s in range(0, len(u8), per_chunk):
            e = min(s + per_chunk, len(u8))
            x = work[: e - s]
            x.copy_(u8.index_select(0, order_t[s:e])).mul_(1.0 / 255.0)
            self._chunk_(x, p.take(slice(s, e)))
            out.index_copy_(0, order_t[s:e], x)
        return out

    def view(self, u8: torch.Tensor, seeds: Sequence[int] | torch.Tensor, view: int) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 normalized: view ``view``'s augmentation of the samples ``seeds``."""
        return self._one_view(u8, self.params(seeds, view))

    def normalize(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std, no photometric op (the same arithmetic)."""
        x = new_batch_tensor(u8.shape, torch.float32, u8.device).copy_(u8).mul_(1.0 / 255.0)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def __call__(self, views: Sequence[torch.Tensor], seeds: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """Every view's augmentation, the views of one size run as one batch (globals: one, locals: one).

        Each sample's arithmetic does not depend on the rows beside it (see the class docstring), so this
        equals ``[self.view(u8, seeds, v) for v, u8 in enumerate(views)]`` bit for bit, in a third of the
        calls for DINO's 2 + N views: on small crops the ops' fixed cost is the time (issue 28's profile)."""
        if len(views) != len(self.views):
            raise ValueError(f"expected {len(self.views)} views (n_global={self.crops.n_global}, "
                             f"n_local={self.crops.n_local}), got {len(views)}")
        out: list[torch.Tensor | None] = [None] * len(views)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for v, u8 in enumerate(views):
            by_shape.setdefault((*u8.shape, u8.device.type), []).append(v)
        for group in by_shape.values():
            params = [self.params(seeds, v) for v in group]
            joined = _ViewParams(*(np.concatenate([getattr(p, f) for p in params])
                                   for f in _ViewParams.__dataclass_fields__))
            augmented = self._one_view(torch.cat([views[v] for v in group]), joined)
            for v, x in zip(group, augmented.split([len(views[v]) for v in group])):
                out[v] = x
        return out  # type: ignore[return-value]


class GramCropAugment:
    """The Gram teacher's crops (see the module docstring): ``(views, seeds) -> list of float32 (B, 3, s, s)``.

    ``views``: the ``n_global`` uint8 Gram crops (B, 3, gram_size, gram_size), in global-view order. With
    ``crops.gram_no_distortions`` (DINOv3's Gram stage) they are only normalized; otherwise crop g gets
    global view g's photometric parameters (the same draws), the blur's sigma scaled to its size.
    """

    def __init__(self, crops: CropsConfig) -> None:
        if crops.gram_size is None:
            raise ValueError("GramCropAugment needs crops.gram_size")
        scale = crops.gram_size / crops.global_size
        sigma = (crops.blur_sigma[0] * scale, crops.blur_sigma[1] * scale)
        self.augment = PhotometricAugment(dataclasses.replace(crops, blur_sigma=sigma))
        self.distort = not crops.gram_no_distortions

    def __call__(self, views: Sequence[torch.Tensor], seeds: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        if self.distort:
            return [self.augment.view(u8, seeds, g) for g, u8 in enumerate(views)]
        return [self.augment.normalize(u8) for u8 in views]
