"""From PIL images and sample dicts to tensors: the pieces the training views and the eval transform share.

:func:`pil_to_uint8_chw` turns an RGB image into a uint8 (3, H, W) tensor; :func:`new_batch_tensor`
allocates a batch (in shared memory inside a DataLoader worker); :func:`batch_fields` stacks the
label, index and bad-image count that every sample of ``ImageFolderDataset`` carries.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


def pil_to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W) (a permuted view of an HWC copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def new_batch_tensor(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty batch tensor; in a DataLoader worker it is allocated in shared memory directly
    (as ``default_collate`` does), which saves the copy made when the batch is sent to the main
    process."""
    if device.type == "cpu" and torch.utils.data.get_worker_info() is not None:
        try:
            storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
            return torch.empty(0, dtype=dtype).new(storage).resize_(*shape)
        except (AttributeError, RuntimeError):  # private API changed: fall back to a plain tensor
            pass
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def batch_fields(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fields every batch carries: ``{"label": (B,) long, "index": (B,) long, "bad": int (sum)}``."""
    return {
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),
        "bad": int(sum(int(s.get("bad", 0)) for s in samples)),
    }
