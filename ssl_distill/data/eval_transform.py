"""The evaluation view and its batches: resize, centre crop, normalize (no randomness).

:class:`EvalTransform` is DINO's evaluation transform (k-NN, linear probe features, online k-NN);
:func:`collate_eval` stacks its samples into ``{"image", "label", "index", "bad"}`` batches.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from ssl_distill.data.tensors import batch_fields, new_batch_tensor, pil_to_uint8_chw


class EvalTransform:
    """Evaluation view: Resize(resize_size, bicubic, shorter side) -> CenterCrop(size) -> normalize.

    ``(img, seed) -> float32 Tensor (3, size, size)``; the seed is ignored.
    """

    def __init__(self, size: int = 224, resize_size: int = 256,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        if not 0 < size <= resize_size:
            raise ValueError(f"need 0 < size <= resize_size, got size={size}, resize_size={resize_size}")
        self.size, self.resize_size = int(size), int(resize_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def geometry(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop left, crop top) of the view of a ``width x height`` image."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize_size * long / short)
        new_w, new_h = (self.resize_size, new_long) if width <= height else (new_long, self.resize_size)
        return new_w, new_h, int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))

    def boxes_to_view(self, boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """(N, 4) xyxy boxes in a ``width x height`` image's pixels -> the same boxes in the view's pixels
        (scaled with the resize, shifted by the crop, clipped to the ``size x size`` view)."""
        new_w, new_h, left, top = self.geometry(width, height)
        scale = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float64)
        shift = torch.tensor([left, top] * 2, dtype=torch.float64)
        return (boxes.to(torch.float64) * scale - shift).clamp(0, self.size)

    def __call__(self, img: Image.Image, seed: int = 0) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        new_w, new_h, left, top = self.geometry(*img.size)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + self.size, top + self.size))
        x = pil_to_uint8_chw(img).to(torch.float32).div_(255.0)
        return x.sub_(self.mean).div_(self.std)


def collate_eval(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`EvalTransform` samples: ``{"image": (B, 3, H, W), "label", "index", "bad"}``."""
    if not samples:
        raise ValueError("empty batch")
    first = samples[0]["image"]
    out = new_batch_tensor((len(samples), *first.shape), first.dtype, first.device)
    return {"image": torch.stack([s["image"] for s in samples], out=out), **batch_fields(samples)}
