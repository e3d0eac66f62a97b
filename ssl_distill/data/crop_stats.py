"""What decides whether ODIS's object-aware cropping can matter on a set of boxed images, before any training.

ODIS (Hızlı, Yıldız and Marttinen 2025) argues that two crops of a scene with several objects often show
different objects, so image-level self-distillation asks one view's [CLS] to predict another object's
target; object-aware crops (:mod:`ssl_distill.data.object_crops`) share one target object. Whether that can
change anything on a benchmark is a property of its boxes and crop settings, measured here with the
training code's own crops on N samples (sample i: image ``i mod n_images``, the sample seed of epoch
``i // n_images`` and that index under the run seed, as :class:`~ssl_distill.data.sampler.EpochSampler`
gives it):

- **dominant item** of a view (:func:`~ssl_distill.data.object_crops.dominant_item`): the box with the
  largest visible area ``|box ∩ crop|`` (the first of equal areas), or none when no box reaches into the crop;
- ``plain_disagree``: share of samples whose first two plain global views have different dominant items;
- ``redrawn``: share of global crops the object-aware transform draws differently from the plain one;
- ``paired``: share of samples for which a pair holding one target was found;
- ``aware_disagree``: ``plain_disagree`` on the object-aware views (a sample without a pair: its plain ones);
- ``target_not_dominant``: share of paired samples where the target is not the dominant item of every
  global view (what the [CLS] of an object-aware pair would still disagree on);
- ``mask_cover``: the [OBJ] mask's mean share of the patch grid, over the valid global views;
- ``box_cover``: the target box's mean share of the view's area, over the same views (the mask is the box
  rounded out to whole patches, so ``mask_cover >= box_cover``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ssl_distill.data.object_crops import ObjectMultiCropTransform, dominant_item
from ssl_distill.data.rng import sample_seed

__all__ = ["CropStatistics", "crop_statistics"]


@dataclass(frozen=True)
class CropStatistics:
    """The shares of :func:`crop_statistics` (module docstring), each in [0, 1]."""

    samples: int
    plain_disagree: float
    redrawn: float
    paired: float
    aware_disagree: float
    target_not_dominant: float
    mask_cover: float
    box_cover: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def line(self) -> str:
        """One line for a log, in percent."""
        return (f"{self.samples} samples: plain global pairs disagree on the dominant item {100 * self.plain_disagree:.1f}%, "
                f"object-aware redraws {100 * self.redrawn:.1f}% of global crops, pairs {100 * self.paired:.1f}% of "
                f"samples, object-aware pairs disagree {100 * self.aware_disagree:.1f}% (target not dominant in both "
                f"views: {100 * self.target_not_dominant:.1f}% of pairs), [OBJ] mask covers "
                f"{100 * self.mask_cover:.1f}% of the grid (the box {100 * self.box_cover:.1f}% of the view)")


def crop_statistics(transform: ObjectMultiCropTransform, images: Sequence[tuple[int, int, np.ndarray]],
                    n_samples: int, seed: int = 0) -> CropStatistics:
    """The statistics of the module docstring over ``n_samples`` samples of ``images``.

    Args:
        transform: the object-aware transform of the run (its plain transform gives the plain views).
        images: (width, height, float (n, 4) xyxy boxes) per image; n may be 0.
        n_samples: samples drawn, cycling through the images epoch by epoch.
        seed: the run seed.
    """
    if not images or n_samples < 1:
        raise ValueError("crop statistics need at least one image and one sample")
    if transform.n_global < 2:
        raise ValueError("crop statistics compare two global views: n_global must be >= 2")
    plain_dis = aware_dis = redrawn = paired = not_dominant = 0
    mask_cover: list[float] = []
    box_cover: list[float] = []
    for i in range(n_samples):
        epoch, index = divmod(i, len(images))
        width, height, boxes = images[index]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = sample_seed(seed, epoch, index)
        plain = transform.plain.geometry(width, height, s)
        views = transform.draw(width, height, s, boxes)
        g = transform.n_global
        plain_dis += dominant_item(boxes, plain[0]) != dominant_item(boxes, plain[1])
        dom = [dominant_item(boxes, c) for c in views.crops[:g]]
        aware_dis += dom[0] != dom[1]
        redrawn += sum(a != b for a, b in zip(plain[:g], views.crops[:g]))
        if views.paired:
            paired += 1
            not_dominant += any(d != views.target for d in dom)
            masks = transform.object_masks(views)
            for v in range(g):
                mask_cover.append(float(masks[v].float().mean()))
                x0, y0, x1, y1 = views.view_boxes[v]
                box_cover.append((x1 - x0) * (y1 - y0) / transform.sizes[v] ** 2)
    n = float(n_samples)
    return CropStatistics(samples=n_samples, plain_disagree=plain_dis / n, redrawn=redrawn / (n * transform.n_global),
                          paired=paired / n, aware_disagree=aware_dis / n,
                          target_not_dominant=not_dominant / paired if paired else 0.0,
                          mask_cover=float(np.mean(mask_cover)) if mask_cover else 0.0,
                          box_cover=float(np.mean(box_cover)) if box_cover else 0.0)
