"""The pretraining batch: the multi-crop views of a batch of samples, stacked and augmented.

:class:`MultiCropCollate` stacks the views of :class:`~ssl_distill.data.views.MultiCropTransform`
(or :class:`~ssl_distill.data.object_crops.ObjectMultiCropTransform`), applies
:class:`~ssl_distill.data.photometric.PhotometricAugment`, and adds the sample seeds, iBOT's masks
(:mod:`ssl_distill.data.masking`), the object masks and Gram anchoring's teacher crops when the run
has them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ssl_distill.config import CropsConfig
from ssl_distill.data.masking import BatchMasking
from ssl_distill.data.photometric import GramCropAugment, PhotometricAugment
from ssl_distill.data.rng import MASK63
from ssl_distill.data.tensors import batch_fields, new_batch_tensor
from ssl_distill.data.views import view_specs


class MultiCropCollate:
    """Batch samples of ``ImageFolderDataset(files, MultiCropTransform(crops))``.

    Input: dicts with ``"image"`` (list of uint8 views), ``"label"``, ``"index"``, ``"bad"`` and
    ``"seed"``. Output::

        {"crops": list of n_global + n_local float32 (B, 3, s, s) normalized tensors, globals first
                  (uint8 un-augmented views when photometric=False),
         "label": LongTensor (B,), "index": LongTensor (B,), "seed": LongTensor (B,),
         "bad": int (sum over the batch),
         "masks": list of n_global bool (B, h * w), True = masked   # only with ``masking``
         "obj_masks": list of V bool (B, P_v), True = patch inside the view's object   # only with boxes
         "obj_valid": bool (B, V), True = view v of image b holds its target object}    # only with boxes
         "gram_crops": list of n_global float32 (B, 3, g, g), the global views at crops.gram_size
                       (:class:`~ssl_distill.data.photometric.GramCropAugment`)   # only with gram_size, where
                                                                # the samples carry them (their epoch's)

    ``masking`` (:func:`ssl_distill.data.masking.build_masking`) draws iBOT's masks of the global
    views from the sample seeds (and the samples' ``"epoch"``, for ``pred_start_epoch``); it draws
    on streams of its own, so the crops are the same with or without it. ``"obj_masks"`` and
    ``"obj_valid"`` are stacked from the samples when they carry them
    (:class:`ssl_distill.data.object_crops.ObjectMultiCropTransform`): all samples or none.
    """

    def __init__(self, crops: CropsConfig, photometric: bool = True, masking: BatchMasking | None = None) -> None:
        self.n_views = len(view_specs(crops))
        self.n_gram = crops.n_global if crops.gram_size is not None else 0  # the Gram crops after the views
        self.photometric = PhotometricAugment(crops) if photometric else None
        self.gram = GramCropAugment(crops) if photometric and self.n_gram else None
        self.masking = masking

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("empty batch")
        for s in samples:
            if "seed" not in s:
                raise KeyError("MultiCropCollate needs each sample's 'seed' (use ImageFolderDataset)")
            n = len(s["image"])  # the Gram crops may be left out (before the Gram term's epoch), in every sample
            if n != len(samples[0]["image"]) or n not in (self.n_views + self.n_gram, self.n_views):
                also = f" (or {self.n_views} without the Gram crops, in every sample)" if self.n_gram else ""
                raise ValueError(f"sample {s.get('index')} has {n} views, expected {self.n_views + self.n_gram}{also}")
        seeds = [int(s["seed"]) for s in samples]
        views = []
        for v in range(len(samples[0]["image"])):
            first = samples[0]["image"][v]
            out = new_batch_tensor((len(samples), *first.shape), first.dtype, first.device) if self.photometric is None else None
            views.append(torch.stack([s["image"][v] for s in samples], out=out))
        views, gram = views[: self.n_views], views[self.n_views :]
        crops = self.photometric(views, seeds) if self.photometric is not None else views
        out = {"crops": crops, **batch_fields(samples), "seed": torch.tensor([x & MASK63 for x in seeds], dtype=torch.long)}
        if gram:
            out["gram_crops"] = self.gram(gram, seeds) if self.gram is not None else gram
        if self.masking is not None:
            epochs = [s["epoch"] for s in samples] if all("epoch" in s for s in samples) else None
            out["masks"] = self.masking(seeds, epochs)
        with_objects = sum("obj_masks" in s for s in samples)
        if with_objects:
            if with_objects != len(samples):
                raise ValueError(f"{with_objects} of {len(samples)} samples carry object masks: all or none must")
            out["obj_masks"] = [torch.stack([s["obj_masks"][v] for s in samples]) for v in range(self.n_views)]
            out["obj_valid"] = torch.stack([s["obj_valid"] for s in samples])
        return out
