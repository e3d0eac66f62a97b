"""A frozen backbone as a feature extractor: the feature layouts, the inference precision, and the loop
that runs a backbone over a loader. What every evaluation (eval/'s tools) and the engine's online k-NN
extract features with.

Feature layouts (:class:`FeatureSpec`), all taken after the final LayerNorm:

- ``cls``: the CLS token of the last block (``n_last_blocks=1``), or of the last ``n`` blocks
  concatenated (oldest first; DINO's ``n_last_blocks=4`` for ViT-S linear evaluation);
- ``mean``: the mean of the last block's patch tokens (registers excluded);
- ``cls+mean``: the CLS tokens of the last ``n`` blocks, then the mean patch token (DINOv2's
  ``create_linear_input`` order);
- ``cls+mean-dino``: DINO's ``eval_linear.py`` layout for ViT-B (``avgpool_patchtokens``, ``n=1``):
  CLS and mean patch token interleaved, ``[cls_0, mean_0, cls_1, mean_1, ...]``, so that DINO's released
  linear weights apply unchanged;
- ``obj``: ODIS's [OBJ] token of the last ``n`` blocks, attending to every patch, or to the patches of the
  ``obj_mask`` given with the images (a box on the patch grid): the image-level read-out ODIS reports
  ("using masks at inference time", the paper's abstract). Needs a backbone with an [OBJ] token (a model
  trained without one gets it initialised from its [CLS]).

Precision: fp32 by default, as DINO's evaluations; ``bf16`` is the fast option (see :func:`prepare_inference`).

The loop, :func:`extract_features`:

Batches are dicts ``{"image": (B, 3, H, W) float, "label": LongTensor (B,), "index": LongTensor (B,)}``.
Every feature row is written at its batch ``index``, so the returned rows follow the dataset order
whatever order the loader yields (shuffled samplers, several workers). Single-process only: every
index in ``[0, len(dataset))`` must be seen exactly once (a ``drop_last`` loader or a distributed
sampler that pads / splits the dataset is refused with a clear error).
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = [
    "LAYOUTS",
    "FeatureExtractor",
    "FeatureSpec",
    "amp_dtype_for",
    "extract_features",
    "prepare_inference",
]


# ----------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------
LAYOUTS = ("cls", "mean", "cls+mean", "cls+mean-dino", "obj")


@dataclass(frozen=True)
class FeatureSpec:
    """Which tokens make the feature vector (see the module docstring)."""

    layout: str = "cls"
    n_last_blocks: int = 1

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"feature layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {self.n_last_blocks}")
        if self.layout in ("mean", "cls+mean-dino") and self.n_last_blocks != 1:
            raise ValueError(f"layout {self.layout!r} uses the last block only (n_last_blocks=1)")

    def dim(self, embed_dim: int) -> int:
        """Feature width for a backbone of width ``embed_dim``."""
        n_cls = 0 if self.layout == "mean" else self.n_last_blocks
        return embed_dim * (n_cls + int("mean" in self.layout))

    def name(self) -> str:
        return self.layout if self.n_last_blocks == 1 else f"{self.layout}@{self.n_last_blocks}"


class FeatureExtractor(nn.Module):
    """Frozen backbone + :class:`FeatureSpec`: ``(B, 3, H, W) -> (B, spec.dim(D))``; the ``obj`` layout also
    takes ``obj_mask`` (B, P) bool, the patches its [OBJ] token reads (None: every patch).

    ``backbone`` must offer ``forward(x) -> CLS`` and ``forward_last_blocks(x, n)`` (:class:`ViTBackbone`).
    """

    def __init__(self, backbone: nn.Module, spec: FeatureSpec = FeatureSpec()) -> None:
        super().__init__()
        depth = getattr(backbone, "depth", None)
        if depth is not None and spec.n_last_blocks > depth:
            raise ValueError(f"n_last_blocks={spec.n_last_blocks} exceeds the backbone's {depth} blocks")
        self.backbone = backbone
        self.spec = spec
        self.dim = spec.dim(int(getattr(backbone, "embed_dim", 0)))

    def forward(self, x: Tensor, obj_mask: Tensor | None = None) -> Tensor:
        spec = self.spec
        if spec.layout == "obj":
            if not getattr(self.backbone, "has_obj_token", False):
                raise ValueError("the obj feature layout needs a backbone with an [OBJ] token (obj_token=True)")
            return self.backbone.forward_last_blocks(x, spec.n_last_blocks, obj_mask=obj_mask)["obj"].flatten(1)
        if obj_mask is not None:
            raise ValueError(f"an object mask needs the obj feature layout, not {spec.layout!r}")
        if spec.layout == "cls" and spec.n_last_blocks == 1:
            return self.backbone(x)
        out = self.backbone.forward_last_blocks(x, spec.n_last_blocks)
        cls = out["cls"].flatten(1)  # (B, n * D), oldest block first
        if spec.layout == "cls":
            return cls
        mean = out["patch"].mean(dim=1)
        if spec.layout == "mean":
            return mean
        if spec.layout == "cls+mean":
            return torch.cat([cls, mean], dim=1)
        return torch.stack([cls, mean], dim=-1).flatten(1)  # DINO: cat((cls[..., None], mean[..., None]), -1)


# ----------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------
def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """``"fp32"`` -> None, ``"bf16"`` -> bfloat16 (CPU and CUDA), ``"fp16"`` -> float16 (CUDA only)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if torch.device(device).type != "cuda":
            raise ValueError("fp16 autocast needs CUDA; use bf16 on CPU")
        return torch.float16
    raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")


class _CastInput(nn.Module):
    """Runs ``module`` on inputs cast to ``dtype``."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # extra args (e.g. obj_mask) as they are
        return self.module(x.to(self.dtype), *args, **kwargs)


def prepare_inference(extractor: nn.Module, precision: str, device: str | torch.device
                      ) -> tuple[nn.Module, torch.dtype | None]:
    """(module to run, autocast dtype) for feature extraction at ``precision`` on ``device``.

    ``bf16`` on CPU runs a bfloat16 copy of the model (inputs cast, LayerNorms included): 2.0-2.2x the
    float32 throughput of ViT-S/16 here, where autocast (LayerNorm and casts in float32) gives 1.8-1.9x.
    On CUDA, bf16 / fp16 use autocast. Attention: the fused kernel, except for the CPU bfloat16 copy
    where the plain matmul-softmax path measured slightly faster. The caller's module is not modified
    (beyond being moved to ``device`` for the autocast and fp32 paths).
    """
    device = torch.device(device)
    amp = amp_dtype_for(precision, device)
    if amp is torch.bfloat16 and device.type == "cpu":
        model = copy.deepcopy(extractor).to(device=device, dtype=torch.bfloat16)
        _set_fused(model, False)
        return _CastInput(model, torch.bfloat16), None
    extractor.to(device)
    _set_fused(extractor, True)
    return extractor, amp


def _set_fused(module: nn.Module, fused: bool) -> None:
    for m in module.modules():
        if hasattr(m, "set_fused_attn") and callable(m.set_fused_attn):
            m.set_fused_attn(fused)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
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
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader`` and return features and labels in dataset order.

    Args:
        model: called as ``model(images) -> (B, D)`` (e.g. a backbone wrapper returning the CLS feature).
            Put in eval mode for the pass; its previous train/eval mode is restored afterwards.
        loader: yields dicts with ``image`` (B, 3, H, W), ``label`` (B,) and ``index`` (B,), and optionally
            ``obj_mask`` (B, P) bool, passed on as ``model(images, obj_mask=...)`` (the ``obj`` layout's boxes).
        device: where the forward pass runs.
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` to run under autocast on ``device.type``,
            or ``None`` for full precision.
        out_dtype: dtype of the returned features (``torch.float16`` halves their memory).

    Returns:
        features: (N, D) ``out_dtype`` (float32 by default) on CPU, row ``i`` = dataset item ``i``.
        labels: (N,) int64 on CPU.

    N is ``len(loader.dataset)`` when the loader has a sized dataset, else ``max(index) + 1``.
    """
    device = torch.device(device)
    rows = _Rows(_dataset_length(loader), out_dtype)
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
                mask = batch.get("obj_mask")
                out = model(images) if mask is None else model(images, obj_mask=mask.to(device))
                if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"model(images) must return (B, D) features; got {shape} for B={images.shape[0]}")
                rows.add(index, label, out.to(device="cpu", dtype=out_dtype))
    finally:
        bar.close()
        model.train(was_training)
    return rows.table()


class _Rows:
    """Feature rows and labels written at their dataset index: into (N, D) and (N,) tables when the dataset's
    size N is known, else collected and assembled at the end (N = max(index) + 1)."""

    def __init__(self, n: int | None, dtype: torch.dtype) -> None:
        self.n, self.dtype = n, dtype
        self.feats: Tensor | None = None
        self.labels: Tensor | None = None
        self.seen: Tensor | None = None
        self.chunks: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, index: Tensor, label: Tensor, out: Tensor) -> None:
        """A batch: (B,) int64 indices and labels, (B, D) features."""
        n = self.n
        if n is None:
            self.chunks.append((index, label, out))
            return
        if self.feats is None:
            self.feats = torch.zeros(n, out.shape[1], dtype=self.dtype)
            self.labels = torch.full((n,), -1, dtype=torch.long)
            self.seen = torch.zeros(n, dtype=torch.long)
        if index.numel() and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"batch index out of range [0, {n}): {index.min()}..{index.max()}")
        self.feats[index] = out
        self.labels[index] = label  # type: ignore[index]
        self.seen.index_add_(0, index, torch.ones_like(index))  # type: ignore[union-attr]

    def table(self) -> tuple[Tensor, Tensor]:
        """(N, D) features and (N,) labels; ValueError unless every index was seen exactly once."""
        if self.n is None:
            self._assemble()
        if self.feats is None or self.seen is None or self.labels is None:
            raise ValueError("the loader yielded no batches")
        missing = int((self.seen == 0).sum())
        repeated = int((self.seen > 1).sum())
        if missing or repeated:
            raise ValueError(
                f"each dataset index must appear exactly once: {missing} missing, {repeated} repeated "
                f"(drop_last loaders and distributed samplers are not supported here)"
            )
        return self.feats, self.labels

    def _assemble(self) -> None:
        chunks = self.chunks
        if not chunks:
            raise ValueError("the loader yielded no batches")
        index = torch.cat([c[0] for c in chunks])
        n = int(index.max()) + 1
        self.feats = torch.zeros(n, chunks[0][2].shape[1], dtype=self.dtype)
        self.labels = torch.full((n,), -1, dtype=torch.long)
        self.feats[index] = torch.cat([c[2] for c in chunks])
        self.labels[index] = torch.cat([c[1] for c in chunks])
        self.seen = torch.bincount(index, minlength=n)
