"""Feature extraction from a frozen backbone, in dataset order.

Batches are dicts ``{"image": (B, 3, H, W) float, "label": LongTensor (B,), "index": LongTensor (B,)}``.
Every feature row is written at its batch ``index``, so the returned rows follow the dataset order
whatever order the loader yields (shuffled samplers, several workers). Single-process only: every
index in ``[0, len(dataset))`` must be seen exactly once (a ``drop_last`` loader or a distributed
sampler that pads / splits the dataset is refused with a clear error).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["extract_features"]


def _dataset_length(loader: Iterable) -> int | None:
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


def extract_features(
    model: nn.Module,
    loader: Iterable[Mapping[str, Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader`` and return features and labels in dataset order.

    Args:
        model: called as ``model(images) -> (B, D)`` (e.g. a backbone wrapper returning the CLS feature).
            Put in eval mode for the pass; its previous train/eval mode is restored afterwards.
        loader: yields dicts with ``image`` (B, 3, H, W), ``label`` (B,) and ``index`` (B,).
        device: where the forward pass runs.
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` to run under autocast on ``device.type``,
            or ``None`` for full precision.

    Returns:
        features: (N, D) float32 on CPU, row ``i`` = dataset item ``i``.
        labels: (N,) int64 on CPU.

    N is ``len(loader.dataset)`` when the loader has a sized dataset, else ``max(index) + 1``.
    """
    device = torch.device(device)
    n_expected = _dataset_length(loader)
    feats: Tensor | None = None
    labels: Tensor | None = None
    seen: Tensor | None = None
    # Without a sized dataset, collect and assemble at the end.
    chunks: list[tuple[Tensor, Tensor, Tensor]] = []

    was_training = model.training
    model.eval()
    bar = tqdm(loader, desc="features", unit="batch", disable=not sys.stderr.isatty(), leave=False)
    try:
        with torch.inference_mode(), torch.autocast(
            device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
        ):
            for batch in bar:
                images = batch["image"].to(device, non_blocking=True)
                index = torch.as_tensor(batch["index"], dtype=torch.long).cpu()
                label = torch.as_tensor(batch["label"], dtype=torch.long).cpu()
                out = model(images)
                if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"model(images) must return (B, D) features; got {shape} for B={images.shape[0]}")
                out = out.float().cpu()
                if n_expected is None:
                    chunks.append((index, label, out))
                    continue
                if feats is None:
                    feats = torch.zeros(n_expected, out.shape[1], dtype=torch.float32)
                    labels = torch.full((n_expected,), -1, dtype=torch.long)
                    seen = torch.zeros(n_expected, dtype=torch.long)
                if index.numel() and (index.min() < 0 or index.max() >= n_expected):
                    raise ValueError(f"batch index out of range [0, {n_expected}): {index.min()}..{index.max()}")
                feats[index] = out
                labels[index] = label  # type: ignore[index]
                seen.index_add_(0, index, torch.ones_like(index))  # type: ignore[union-attr]
    finally:
        bar.close()
        model.train(was_training)

    if n_expected is None:
        if not chunks:
            raise ValueError("the loader yielded no batches")
        index = torch.cat([c[0] for c in chunks])
        n_expected = int(index.max()) + 1
        feats = torch.zeros(n_expected, chunks[0][2].shape[1], dtype=torch.float32)
        labels = torch.full((n_expected,), -1, dtype=torch.long)
        feats[index] = torch.cat([c[2] for c in chunks])
        labels[index] = torch.cat([c[1] for c in chunks])
        seen = torch.bincount(index, minlength=n_expected)
    if feats is None or seen is None or labels is None:
        raise ValueError("the loader yielded no batches")
    missing = int((seen == 0).sum())
    repeated = int((seen > 1).sum())
    if missing or repeated:
        raise ValueError(
            f"each dataset index must appear exactly once: {missing} missing, {repeated} repeated "
            f"(drop_last loaders and distributed samplers are not supported here)"
        )
    return feats, labels
