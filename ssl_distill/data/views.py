"""DINO multi-crop views (Caron et al. 2021, ``DataAugmentationDINO`` in main_dino.py), fast on few CPUs.

Per view DINO applies: RandomResizedCrop(size, scale, ratio, bicubic) -> horizontal flip (p=0.5)
-> ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 (the four ops in a random order) -> RandomGrayscale
(p=0.2) -> GaussianBlur (p = 1.0 first global, 0.1 second global, 0.5 locals; sigma ~ U(0.1, 2))
-> Solarize (threshold 0.5, p=0.2, second global view only) -> ToTensor -> Normalize.

The work is split in two so that the expensive photometric part runs batched:

1. :class:`MultiCropTransform` (this module) ``(img, seed) -> list[uint8 Tensor (3, s, s)]`` does the
   geometry per sample: crop box + flip, then one PIL ``resize(box=...)`` call per view.
2. :class:`~ssl_distill.data.collate.MultiCropCollate` stacks each view to ``uint8 (B, 3, s, s)`` and
   calls :class:`~ssl_distill.data.photometric.PhotometricAugment`, which applies jitter, grayscale,
   blur, solarize and normalization on float tensors with per-sample parameters.

:func:`view_specs` checks the crop settings and lists the views (sizes, scales, blur and solarize
probabilities) both halves follow.

Randomness: every random number is a pure function of ``(sample seed, stream, view, counter)``
(:func:`~ssl_distill.data.rng.counter_uniforms`, a SplitMix64-style counter-based generator). A
sample's views therefore depend only on its image and seed: not on the batch it lands in, the number
of workers, or the process. Seeds come from :class:`~ssl_distill.data.sampler.EpochSampler` through
``ImageFolderDataset`` (the ``"seed"`` key).

Where we differ from DINO's PIL pipeline (intentionally, small): PIL's ``resize(box=...)`` may use
pixels just outside the crop box as filter support, where crop-then-resize replicates the crop's
edge; the photometric differences are listed in :mod:`ssl_distill.data.photometric`.

Configurations with more than two global views: globals after the second use ``blur_p[1]`` and are
never solarized.

Gram anchoring's teacher crops (``crops.gram_size``, DINOv3): each global view's crop box and flip again,
rendered at ``gram_size`` from the source pixels, appended after the views. They draw no random number
of their own, so a run's views are the same with or without them. DINOv3 crops once at the larger of
the two sizes and resizes that crop to both; rendering each from the source gives the same geometry
without a second resampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ssl_distill.config import CropsConfig
from ssl_distill.data.rng import Stream, counter_uniforms
from ssl_distill.data.tensors import pil_to_uint8_chw

_CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params


# --------------------------------------------------------------------------------------------
# Views and validation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewSpec:
    """One view: output size, crop scale range, blur and solarize probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"crops.{name} must be a probability in [0, 1], got {p}")


def view_specs(crops: CropsConfig) -> list[ViewSpec]:
    """The views of a config, globals first: ``n_global`` x global then ``n_local`` x local."""
    if crops.n_global < 1:
        raise ValueError(f"crops.n_global must be >= 1, got {crops.n_global}")
    if crops.n_local < 0:
        raise ValueError(f"crops.n_local must be >= 0, got {crops.n_local}")
    for name in ("global_size", "local_size"):
        if int(getattr(crops, name)) < 1:
            raise ValueError(f"crops.{name} must be >= 1, got {getattr(crops, name)}")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(crops, name)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crops.{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
    if not 0.0 < crops.ratio[0] <= crops.ratio[1]:
        raise ValueError(f"crops.ratio must satisfy 0 < lo <= hi, got {tuple(crops.ratio)}")
    for name in ("flip_p", "jitter_p", "grayscale_p", "solarize_p"):
        _check_prob(name, getattr(crops, name))
    for i, p in enumerate(crops.blur_p):
        _check_prob(f"blur_p[{i}]", p)
    if len(crops.blur_p) != 3:
        raise ValueError(f"crops.blur_p needs 3 entries (global 1, global 2, local), got {crops.blur_p}")
    if not 0.0 < crops.blur_sigma[0] <= crops.blur_sigma[1]:
        raise ValueError(f"crops.blur_sigma must satisfy 0 < lo <= hi, got {tuple(crops.blur_sigma)}")
    if any(j < 0 for j in crops.jitter) or crops.jitter[3] > 0.5:
        raise ValueError(f"crops.jitter must be >= 0 with hue <= 0.5, got {tuple(crops.jitter)}")
    if any(s <= 0 for s in crops.std):
        raise ValueError(f"crops.std must be > 0, got {tuple(crops.std)}")
    specs = [
        ViewSpec(int(crops.global_size), tuple(crops.global_scale), crops.blur_p[0] if g == 0 else crops.blur_p[1],
                 crops.solarize_p if g == 1 else 0.0)
        for g in range(crops.n_global)
    ]
    specs += [ViewSpec(int(crops.local_size), tuple(crops.local_scale), crops.blur_p[2], 0.0)] * crops.n_local
    return specs


# --------------------------------------------------------------------------------------------
# Geometry (per sample)
# --------------------------------------------------------------------------------------------
def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            u: np.ndarray) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` driven by given uniforms.

    Args:
        width, height: image size.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        u: at least ``4 * 10`` uniforms in [0, 1) (area, log-ratio, top, left per try).

    Returns:
        (top, left, crop_height, crop_width); after 10 failed tries, a central crop with the ratio
        clamped to ``ratio`` (torchvision's fallback).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(_CROP_TRIES):
        target_area = area * (scale[0] + u[4 * t] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[4 * t + 1] * (log_hi - log_lo))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[4 * t + 2] * (height - h + 1)), height - h)
            left = min(int(u[4 * t + 3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CropBox:
    """One view's geometry in source pixels: crop ``[left, left + width) x [top, top + height)``,
    resize it to the view's ``size x size``, then mirror left-right when ``flip``."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


VIEW_UNIFORMS = 4 * _CROP_TRIES + 1  # uniforms per view draw: crop tries, then the flip


def view_crop(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], flip_p: float,
              u: np.ndarray) -> CropBox:
    """A view's crop and flip from :data:`VIEW_UNIFORMS` (41) uniforms: :func:`random_resized_crop_box`
    on the first 40, flip when the last is below ``flip_p``."""
    top, left, h, w = random_resized_crop_box(width, height, scale, ratio, u)
    return CropBox(top, left, h, w, bool(u[4 * _CROP_TRIES] < flip_p))


def _render(img: Image.Image, crop: CropBox, size: int) -> torch.Tensor:
    """One view of an RGB image: its box resized bicubically to ``size x size``, flipped -> uint8 (3, size, size)."""
    box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
    view = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if crop.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil_to_uint8_chw(view)


class MultiCropTransform:
    """Per-sample geometry of the multi-crop views: ``(img, seed) -> list[uint8 Tensor (3, s, s)]``.

    For each view: a RandomResizedCrop box (torchvision's algorithm) and a flip decision drawn from
    :func:`counter_uniforms` of ``(seed, view)``, then crop + bicubic resize in one PIL call, then
    flip. Globals first; with ``crops.gram_size`` the ``n_global`` Gram-teacher crops follow (the global
    views' boxes and flips at that size), from epoch ``gram_from_epoch`` on when the sample's epoch is given.
    Deterministic for a given (image, seed); photometric ops are left to
    :class:`~ssl_distill.data.collate.MultiCropCollate`. :meth:`geometry` and :meth:`render` are the
    two halves (object-aware cropping, :mod:`ssl_distill.data.object_crops`, draws its own geometry
    and renders it the same way).
    """

    def __init__(self, crops: CropsConfig, gram_from_epoch: int | None = 0) -> None:
        self.crops = crops
        self.views = view_specs(crops)
        self.ratio = (float(crops.ratio[0]), float(crops.ratio[1]))
        self.gram_from_epoch = gram_from_epoch  # no Gram crops for a sample of an earlier epoch; None: none at all

    def renders_gram(self, epoch: int | None) -> bool:
        """Whether a sample of ``epoch`` (None: not known) gets its Gram-teacher crops: with ``crops.gram_size``,
        from epoch ``gram_from_epoch`` on (the epoch of the Gram term's first step: before it no step reads them),
        never with ``gram_from_epoch`` None (a run whose Gram weight is 0)."""
        if self.crops.gram_size is None or self.gram_from_epoch is None:
            return False
        return epoch is None or epoch >= self.gram_from_epoch

    def geometry(self, width: int, height: int, seed: int) -> list[CropBox]:
        """The plain crop and flip of every view of a ``width x height`` image, globals first."""
        uniforms = counter_uniforms([seed], Stream.GEOMETRY, range(len(self.views)), VIEW_UNIFORMS)[0]
        return [view_crop(width, height, spec.scale, self.ratio, self.crops.flip_p, u)
                for spec, u in zip(self.views, uniforms)]

    def render(self, img: Image.Image, geometry: Sequence[CropBox], gram: bool = True) -> list[torch.Tensor]:
        """Crop + bicubic resize (one PIL call) + flip of an RGB image per view -> uint8 (3, s, s) each;
        then, with ``crops.gram_size`` and ``gram``, the global views' Gram-teacher crops (3, gram_size, gram_size)."""
        out = [_render(img, c, spec.size) for spec, c in zip(self.views, geometry)]
        if gram and self.crops.gram_size is not None:
            out += [_render(img, c, self.crops.gram_size) for c in geometry[: self.crops.n_global]]
        return out

    def __call__(self, img: Image.Image, seed: int, epoch: int | None = None) -> list[torch.Tensor]:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return self.render(img, self.geometry(img.width, img.height, seed), self.renders_gram(epoch))
