"""Linear probes of a frozen backbone: fast (a grid of heads on cached features), faithful (DINO), logistic regression.

Modes
-----
``fast`` (default), DINOv2's linear evaluation on features extracted once (no augmentation):
    the features of the last ``max(blocks)`` blocks' CLS tokens and the last block's mean patch token
    are extracted once per split (and cached on disk); a grid of linear heads {last 1, last 4 blocks} x
    {with, without the mean patch token} x 13 learning rates (1e-5 ... 0.1, each scaled by batch / 256)
    is trained jointly: SGD (batch 256), momentum 0.9, no weight decay, cosine schedule to 0 over
    DINOv2's 12,500 iterations (at least 10 epochs; ``epochs`` to choose), heads initialised N(0, 0.01),
    bias 0 (DINOv2's ``LinearClassifier``). The best head is picked on a
    held-out split of the train set (stratified, 10% by default; never on the test set); its test
    top-1 / top-5 are reported with the whole grid. The heads' inputs are contiguous column ranges of
    the cached features, ``[cls_{L-n+1} ... cls_L, mean_L]``, so every head reads the same cached batch.
    Optional (not DINOv2's): ``standardize`` z-scores the features with the training split's statistics.

``faithful``, DINO's ``eval_linear.py`` protocol:
    frozen backbone, RandomResizedCrop(image_size, scale (0.08, 1)) + horizontal flip of each image every
    epoch, features = CLS of the last ``n_last_blocks`` (4, DINO's ViT-S setting) [+ mean patch token with
    ``--avgpool``, DINO's ViT-B setting: ``cls+mean-dino`` layout for n=1], a linear layer N(0, 0.01),
    SGD lr 0.001 * batch / 256, momentum 0.9, no weight decay, cosine over epochs (``CosineAnnealingLR``
    stepped per epoch), 100 epochs, evaluation on the center-cropped val set. Resumable: a checkpoint is
    written atomically every epoch (and every ``checkpoint_every`` steps); the same command continues it.
    Augmentations depend on (seed, epoch, index) only, so a resumed run matches an uninterrupted one.
    Reported: the last epoch's accuracy and, as DINO reports it, the best accuracy over evaluated epochs
    (selected on the val set, flagged as such).

``logreg``, scikit-learn ``LogisticRegression`` (L-BFGS, multinomial) on standardized cached features:
    the inverse regularisation ``C`` is picked on the held-out split, then refit on the whole train
    set. For small data sets.

Precision: features are extracted in fp32 by default, as DINO's eval_linear.py (``--precision bf16``, or the
run's ``knn.precision``, is the fast option), and the heads train in fp32 as DINO's / DINOv2's heads do
(the fast grid's ``--head-precision bf16`` opts in to bfloat16 GEMMs). Both are written into the results.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ssl_distill.checkpoints import CheckpointError, LoadedBackbone, atomic_save
from ssl_distill.cli_args import linear_arguments as add_arguments  # options: torch-free
from ssl_distill.cli_args import tool_main
from ssl_distill.config import ConfigError
from ssl_distill.data.folder import BadImageCounter, DataError, ImageFolderDataset, scan_image_folder
from ssl_distill.data.eval_transform import collate_eval
from ssl_distill.data.rng import Stream, counter_uniforms
from ssl_distill.data.sampler import EpochSampler
from ssl_distill.data.views import random_resized_crop_box
from ssl_distill.eval_constants import LR_GRID, untrained_cls_note
from ssl_distill.models.backbone import TokenBackbone
from ssl_distill.models.frozen_features import FeatureExtractor, FeatureSpec, amp_dtype_for, prepare_inference
from ssl_distill.runtime import resolve_device

from .features import FeatureSet, ImageSettings, check_same_classes, extract_train_val
from .model import load_model
from .results import default_output, write_results

__all__ = [
    "LR_GRID",
    "HeadSpec",
    "head_grid",
    "stratified_holdout",
    "LinearGrid",
    "topk_accuracy",
    "fast_probe",
    "default_epochs",
    "default_head_compute",
    "logreg_probe",
    "RandomResizedCropFlip",
    "faithful_probe",
    "linear_on_checkpoint",
    "add_arguments",
    "run",
]

def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percent of rows whose label is among the top-k logits (k clipped to the class count)."""
    if labels.numel() == 0:
        return [float("nan")] * len(ks)
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return [100.0 * float(hit[:, : min(k, top.shape[1])].any(dim=1).float().mean()) for k in ks]


# ----------------------------------------------------------------------------------------------------
# Fast mode: a grid of heads trained jointly on cached features
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    """One linear head of the grid: which blocks' CLS tokens, with or without the mean patch token, base lr."""

    blocks: int
    avgpool: bool
    lr: float

    def columns(self, embed_dim: int, max_blocks: int) -> tuple[int, int]:
        """Column range [start, stop) of this head's input in the ``[cls x max_blocks, mean]`` features."""
        start = (max_blocks - self.blocks) * embed_dim
        return start, max_blocks * embed_dim + (embed_dim if self.avgpool else 0)

    def name(self) -> str:
        return f"last{self.blocks}{'+mean' if self.avgpool else ''}_lr{self.lr:g}"


def head_grid(blocks: Sequence[int] = (1, 4), avgpool: Sequence[bool] = (False, True),
              lrs: Sequence[float] = LR_GRID) -> list[HeadSpec]:
    """The cartesian product, in that order."""
    return [HeadSpec(int(n), bool(a), float(lr)) for n in blocks for a in avgpool for lr in lrs]


def stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, held-out indices): ``round(fraction * n_c)`` items of each class held out.

    Classes with a single item stay in train. Deterministic for a given seed.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_out = min(int(round(fraction * idx.numel())), idx.numel() - 1)
        held.append(idx[:n_out])
        train.append(idx[n_out:])
    train_idx, held_idx = torch.cat(train).sort().values, torch.cat(held).sort().values
    if held_idx.numel() == 0:
        raise DataError("the held-out split is empty: too few train images for head selection "
                        f"(fraction {fraction}); add images or raise the fraction")
    return train_idx, held_idx


class LinearGrid:
    """Many linear heads trained jointly by SGD on the same batches of cached features.

    Heads sharing an input column range form a group whose weights are one (P, d) matrix (the
    ``L * C`` rows of its ``L`` heads, zero-padded to a multiple of 32 for the GEMM kernels): one GEMM
    per group and direction per step, no autograd. Per head: its own learning rate (a per-column scale),
    SGD with momentum exactly as ``torch.optim.SGD`` (``buf = m * buf + grad``, ``w -= lr * buf``).
    Heads are independent: each minimises its own mean cross-entropy.

    ``compute="bf16"`` runs the GEMMs in bfloat16 (features converted once; fp32 accumulation, fp32
    master weights, momentum and softmax); ``"fp32"`` everything in float32.
    """

    PAD = 32

    def __init__(self, heads: Sequence[HeadSpec], embed_dim: int, num_classes: int, batch_size: int,
                 momentum: float = 0.9, seed: int = 0, device: str | torch.device = "cpu",
                 compute: str = "fp32") -> None:
        if compute not in ("fp32", "bf16"):
            raise ValueError(f"compute must be fp32 or bf16, got {compute!r}")
        self.heads = list(heads)
        self.embed_dim, self.num_classes, self.batch_size = embed_dim, num_classes, batch_size
        self.max_blocks = max(h.blocks for h in self.heads)
        self.momentum = momentum
        self.device = torch.device(device)
        self.compute = torch.bfloat16 if compute == "bf16" else torch.float32
        g = torch.Generator().manual_seed(seed)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, h in enumerate(self.heads):
            groups.setdefault(h.columns(embed_dim, self.max_blocks), []).append(i)
        self.groups = []
        c = num_classes
        for (start, stop), members in groups.items():
            width = len(members) * c
            padded = -(-width // self.PAD) * self.PAD
            w = torch.zeros(padded, stop - start)  # (out, in) as nn.Linear; rows beyond `width` stay zero
            w[:width] = torch.randn(width, stop - start, generator=g) * 0.01  # DINOv2: N(0, 0.01), bias 0
            lr = torch.zeros(padded)
            lr[:width] = torch.tensor([self.heads[i].lr * batch_size / 256.0 for i in members]).repeat_interleave(c)
            dev = self.device
            self.groups.append({
                "cols": (start, stop), "heads": members, "width": width, "w": w.to(dev),
                "b": torch.zeros(width, device=dev), "vw": torch.zeros_like(w, device=dev),
                "vb": torch.zeros(width, device=dev), "lr": lr.to(dev),
            })

    @property
    def in_dim(self) -> int:
        return self.embed_dim * (self.max_blocks + 1)

    def _logits_t(self, x: Tensor, grp: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(x's group columns (B, d), transposed logits (width, B) float32).

        Transposed so that the softmax over the C classes runs over a non-innermost dimension of size C
        with the batch innermost (vectorized), rather than over rows of 10 elements.
        """
        start, stop = grp["cols"]
        xg = x[:, start:stop]
        out = torch.mm(grp["w"].to(self.compute), xg.t())
        return xg, out[: grp["width"]].float().add_(grp["b"][:, None])

    def step(self, x: Tensor, y: Tensor, lr_scale: float, with_loss: bool = True) -> Tensor | None:
        """One SGD step on a batch (x (B, in_dim) in the compute dtype, y (B,) int64).

        Returns each head's mean loss on the batch (before the step) when ``with_loss``.
        """
        b = x.shape[0]
        c = self.num_classes
        losses = torch.empty(len(self.heads), device=x.device) if with_loss else None
        for grp in self.groups:
            xg, logits = self._logits_t(x, grp)
            n_heads = len(grp["heads"])
            prob = torch.softmax(logits.view(n_heads, c, b), dim=1)
            target = y.view(1, 1, b).expand(n_heads, 1, b)
            if losses is not None:
                losses[grp["heads"]] = -prob.gather(1, target).clamp_min_(1e-30).log_().mean(dim=(1, 2))
            prob.scatter_add_(1, target, torch.full((n_heads, 1, b), -1.0, device=x.device))  # dCE/dlogits * B
            grad = torch.zeros(grp["w"].shape[0], b, dtype=self.compute, device=x.device)
            grad[: grp["width"]] = prob.view(-1, b)
            lr = (grp["lr"] * lr_scale)[:, None]
            grp["vw"].mul_(self.momentum).add_(torch.mm(grad, xg).float(), alpha=1.0 / b)  # mean over the batch
            grp["vb"].mul_(self.momentum).add_(prob.sum(dim=2).view(-1), alpha=1.0 / b)
            grp["w"].addcmul_(grp["vw"], lr, value=-1.0)
            grp["b"].addcmul_(grp["vb"], lr[: grp["width"], 0], value=-1.0)
        return losses

    def fit(self, feats: Tensor, labels: Tensor, indices: Tensor, epochs: int, seed: int = 0,
            log_every: int = 0) -> list[float]:
        """Train on ``feats[indices]`` for ``epochs`` (shuffled each epoch, last partial batch kept).

        The cosine schedule runs over all iterations (DINOv2: ``CosineAnnealingLR(max_iter, eta_min=0)``).
        Returns the mean loss of every head over the last epoch (computed during that epoch only).
        """
        n = indices.numel()
        steps_per_epoch = math.ceil(n / self.batch_size)
        total = steps_per_epoch * epochs
        g = torch.Generator().manual_seed(seed)
        feats = feats.to(self.device, self.compute)  # one conversion (a copy only if dtype/device change)
        labels = labels.to(self.device)
        step = 0
        last = torch.zeros(len(self.heads), device=self.device)
        for epoch in range(epochs):
            order = indices[torch.randperm(n, generator=g)].to(self.device)
            final = epoch == epochs - 1
            for s in range(0, n, self.batch_size):
                idx = order[s : s + self.batch_size]
                lr_scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = self.step(feats.index_select(0, idx), labels[idx], lr_scale, with_loss=final or bool(log_every))
                if final:
                    last += loss * idx.numel()
                step += 1
                if log_every and step % log_every == 0:
                    print(f"[linear] epoch {epoch} step {step}/{total} best-head loss {float(loss.min()):.4f}",
                          flush=True)
        return [float(v) for v in last / max(n, 1)]

    @torch.no_grad()
    def logits(self, feats: Tensor, indices: Tensor | None = None, chunk: int = 8192) -> Tensor:
        """(N, heads, C) logits of every head, float32 on CPU."""
        idx_all = torch.arange(feats.shape[0]) if indices is None else indices
        out = torch.empty(idx_all.numel(), len(self.heads), self.num_classes)
        for s in range(0, idx_all.numel(), chunk):
            idx = idx_all[s : s + chunk]
            x = feats.index_select(0, idx.to(feats.device)).to(self.device, self.compute)
            for grp in self.groups:
                _, lg = self._logits_t(x, grp)
                out[s : s + idx.numel(), grp["heads"]] = lg.view(len(grp["heads"]), self.num_classes,
                                                                 idx.numel()).permute(2, 0, 1).cpu()
        return out

    def head_state(self, i: int) -> dict[str, Any]:
        """Weights of head ``i`` as an ``nn.Linear`` state dict plus its input columns."""
        for grp in self.groups:
            if i in grp["heads"]:
                j = grp["heads"].index(i)
                c = self.num_classes
                return {"weight": grp["w"][j * c:(j + 1) * c].clone().cpu(),
                        "bias": grp["b"][j * c:(j + 1) * c].clone().cpu(), "columns": list(grp["cols"]),
                        "head": dataclasses.asdict(self.heads[i])}
        raise IndexError(i)


DINOV2_ITERATIONS = 12500  # DINOv2's linear evaluation: 10 "epochs" of 1,250 iterations


def default_epochs(n_train: int, batch_size: int) -> int:
    """Epochs for DINOv2's 12,500 iterations, at least 10."""
    return max(10, math.ceil(DINOV2_ITERATIONS / math.ceil(n_train / batch_size)))


def _column_stats(x: Tensor, rows: Tensor, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """Mean and std (float32, floored at 1e-6) of each column over ``x[rows]``, in chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for s in range(0, rows.numel(), chunk):
        block = x.index_select(0, rows[s : s + chunk]).double()
        total += block.sum(0)
        sq += (block * block).sum(0)
    n = max(rows.numel(), 1)
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def default_head_compute(device: str | torch.device) -> str:
    """bf16 where it is native (CUDA; CPUs with AVX512-BF16 / AMX as oneDNN reports), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def fast_probe(train: FeatureSet, test: FeatureSet, embed_dim: int, max_blocks: int,
               heads: Sequence[HeadSpec] | None = None, epochs: int | None = None, batch_size: int = 256,
               holdout: float = 0.1, seed: int = 0, device: str | torch.device = "cpu",
               compute: str = "fp32", standardize: bool = False, log_every: int = 0) -> dict[str, Any]:
    """Train the head grid on ``train`` (minus the held-out split), pick on held-out, report on ``test``.

    ``epochs``: None gives DINOv2's schedule length, 12,500 iterations (at least 10 epochs).
    ``compute``: ``"fp32"`` (default, as DINOv2's heads), ``"bf16"`` or ``"auto"`` (:func:`default_head_compute`).
    ``standardize``: z-score every feature with the training split's mean and std first (not in
    DINOv2's protocol; same hypothesis class, better conditioned SGD; off by default).

    Features must be ``FeatureSpec("cls+mean", max_blocks)`` features (width ``(max_blocks + 1) * D``).
    """
    heads = list(heads) if heads is not None else head_grid((1, max_blocks))
    if any(h.blocks > max_blocks for h in heads):
        raise ValueError(f"heads use up to {max(h.blocks for h in heads)} blocks, features have {max_blocks}")
    expected = (max_blocks + 1) * embed_dim
    if train.features.shape[1] != expected or test.features.shape[1] != expected:
        raise ValueError(f"features must be {expected} wide (cls x {max_blocks} + mean of width {embed_dim})")
    num_classes = len(train.classes) or int(train.labels.max()) + 1
    compute = default_head_compute(device) if compute == "auto" else compute
    train_idx, held_idx = stratified_holdout(train.labels, holdout, seed)
    steps_per_epoch = math.ceil(train_idx.numel() / batch_size)
    epochs = default_epochs(train_idx.numel(), batch_size) if epochs is None else epochs
    x_train, x_test = train.features, test.features
    if standardize:
        mean, std = _column_stats(x_train, train_idx)
        x_train, x_test = ((x - mean).div_(std) for x in (x_train.float(), x_test.float()))
    grid = LinearGrid(heads, embed_dim, num_classes, batch_size, seed=seed, device=device, compute=compute)
    t0 = time.perf_counter()
    losses = grid.fit(x_train, train.labels, train_idx, epochs, seed=seed, log_every=log_every)
    t_train = time.perf_counter() - t0
    held_logits = grid.logits(x_train, held_idx)
    test_logits = grid.logits(x_test)
    test_y = test.labels
    rows = _grid_rows(heads, batch_size, losses, (held_logits, train.labels[held_idx]), (test_logits, test_y))
    # best on held-out top-1; ties: lower held-out loss is not tracked, so the first (smallest lr) wins
    best_i = max(range(len(rows)), key=lambda i: (rows[i]["holdout_top1"], rows[i]["holdout_top5"], -i))
    best = rows[best_i]
    per_class = _per_class_top1(test_logits[:, best_i].argmax(dim=1), test_y, num_classes)
    lr_values = sorted({h.lr for h in heads})
    return {
        "mode": "fast", "selection": "held-out split of train", "best": best,
        "top1": best["test_top1"], "top5": best["test_top5"], "per_class": per_class,
        "grid": rows, "n_heads": len(heads), "epochs": epochs, "iterations": epochs * steps_per_epoch,
        "best_lr_at_grid_edge": grid_edge(best["lr"], lr_values),
        "batch_size": batch_size, "standardize": standardize,
        "n_train": int(train_idx.numel()), "n_holdout": int(held_idx.numel()), "n_test": int(test_y.numel()),
        "holdout_fraction": holdout, "compute": compute, "seconds_train": t_train,
        "best_head_state": grid.head_state(best_i),
    }


def _grid_rows(heads: Sequence[HeadSpec], batch_size: int, losses: list[float], held: tuple[Tensor, Tensor],
               test: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
    """One row per head: its settings, held-out and test top-1 / top-5 from its logits ((N, heads, C), labels
    (N,) of each split) and its final training loss."""
    rows = []
    for i, h in enumerate(heads):
        h1, h5 = topk_accuracy(held[0][:, i], held[1])
        t1, t5 = topk_accuracy(test[0][:, i], test[1])
        rows.append({"name": h.name(), "blocks": h.blocks, "avgpool": h.avgpool, "lr": h.lr,
                     "lr_scaled": h.lr * batch_size / 256.0, "holdout_top1": h1, "holdout_top5": h5,
                     "test_top1": t1, "test_top5": t5, "final_train_loss": losses[i]})
    return rows


def _per_class_top1(pred: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """(N,) predictions and labels -> top-1 % per class, None for a class without test items."""
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(100.0 * float((pred[mask] == c).float().mean()) if mask.any() else None)
    return per_class


# ----------------------------------------------------------------------------------------------------
# Logistic regression (scikit-learn)
# ----------------------------------------------------------------------------------------------------
def logreg_probe(train: FeatureSet, test: FeatureSet, cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
                 holdout: float = 0.1, seed: int = 0, max_iter: int = 1000) -> dict[str, Any]:
    """L-BFGS multinomial logistic regression: C picked on the held-out split, refit on all of train."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = train.features.float().numpy()
    y = train.labels.numpy()
    x_test, y_test = test.features.float().numpy(), test.labels.numpy()
    train_idx, held_idx = (t.numpy() for t in stratified_holdout(train.labels, holdout, seed))
    def fit(c: float, rows_idx: np.ndarray) -> tuple[Any, Any, bool]:
        scaler = StandardScaler().fit(x[rows_idx])
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded in the results instead
            clf.fit(scaler.transform(x[rows_idx]), y[rows_idx])
        return scaler, clf, bool(np.max(clf.n_iter_) < max_iter)

    rows = []
    t0 = time.perf_counter()
    for c in cs:
        scaler, clf, converged = fit(c, train_idx)
        held = torch.from_numpy(clf.predict_proba(scaler.transform(x[held_idx])))
        h1, h5 = topk_accuracy(held, torch.from_numpy(_remap(clf.classes_, y[held_idx])))
        rows.append({"C": c, "holdout_top1": h1, "holdout_top5": h5, "iterations": int(np.max(clf.n_iter_)),
                     "converged": converged})
    best = max(rows, key=lambda r: (r["holdout_top1"], r["holdout_top5"]))
    edge = grid_edge(best["C"], sorted(cs))
    scaler, clf, converged = fit(best["C"], np.arange(len(y)))
    proba = torch.from_numpy(clf.predict_proba(scaler.transform(x_test)))
    t1, t5 = topk_accuracy(proba, torch.from_numpy(_remap(clf.classes_, y_test)))
    return {"mode": "logreg", "selection": "held-out split of train, then refit on all of train",
            "best": dict(best, test_top1=t1, test_top5=t5, refit_converged=converged), "top1": t1, "top5": t5,
            "grid": rows, "best_C_at_grid_edge": edge,
            "n_train": int(len(y)), "n_holdout": int(len(held_idx)), "n_test": int(len(y_test)),
            "seconds_train": time.perf_counter() - t0}


def grid_edge(value: float, grid: Sequence[float]) -> str | None:
    """``"high"`` / ``"low"`` when ``value`` is the largest / smallest of a grid of several values, else None.

    A selected hyper-parameter on the edge of its grid means the optimum may lie outside it.
    """
    if len(grid) < 2:
        return None
    return "high" if value == max(grid) else "low" if value == min(grid) else None


def _remap(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Labels -> column index in predict_proba (classes absent from train map to -1: never correct)."""
    lookup = {int(c): i for i, c in enumerate(classes)}
    return np.array([lookup.get(int(v), -1) for v in y], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# Faithful mode: DINO's eval_linear protocol
# ----------------------------------------------------------------------------------------------------
class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio; bilinear, torchvision's default) + horizontal flip + normalize.

    ``(img, seed) -> float32 (3, size, size)``; the crop and flip are pure functions of ``seed`` (given by
    :class:`EpochSampler` as a function of run seed, epoch and index).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        self.size, self.scale, self.ratio, self.flip_p = int(size), tuple(scale), tuple(ratio), float(flip_p)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image, seed: int = 0) -> Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        u = counter_uniforms([seed], Stream.LINEAR_PROBE, 0, 41)[0]
        top, left, h, w = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, u)
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if u[40] < self.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)


FAITHFUL_FORMAT = "ssl-distill-linear/1"
#: what the faithful probe says about unreadable images (it resumes only on the same file list)
FAITHFUL_ADVICE = ("replace or repair them, then run the same command: the probe continues from its last "
                   "checkpoint (with files deleted it would start over: give it another --out).")


def _faithful_layout(n_last_blocks: int, avgpool: bool) -> FeatureSpec:
    if not avgpool:
        return FeatureSpec("cls", n_last_blocks)
    # DINO's avgpool layout only exists for n=1 (its concatenation fails otherwise); DINOv2's order for n>1
    return FeatureSpec("cls+mean-dino", 1) if n_last_blocks == 1 else FeatureSpec("cls+mean", n_last_blocks)


@torch.no_grad()
def _evaluate_head(extractor: nn.Module, head: nn.Linear, loader: Any, device: torch.device,
                   amp: torch.dtype | None) -> tuple[float, float, float]:
    """Top-1, top-5 (%) and mean cross-entropy of ``head`` on ``loader``'s images; DataError when more than
    1% of them were unreadable (and substituted), before any figure is returned."""
    head.eval()
    total = c1 = c5 = 0
    loss = 0.0
    bad = BadImageCounter(advice=FAITHFUL_ADVICE)
    for batch in loader:
        bad.update(batch["bad"], len(batch["label"]))
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            f = extractor(x)
        logits = head(f.float())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        a1, a5 = topk_accuracy(logits, y)
        c1 += a1 * y.numel() / 100.0
        c5 += a5 * y.numel() / 100.0
        total += y.numel()
    bad.finalize()
    head.train()
    return 100.0 * c1 / total, 100.0 * c5 / total, loss / total


def faithful_probe(extractor: FeatureExtractor, train_dir: str | Path, val_dir: str | Path, out_dir: str | Path,
                   settings: ImageSettings, *, epochs: int = 100, lr: float = 0.001, batch_size: int = 128,
                   num_workers: int = 2, device: str | torch.device = "cpu", precision: str = "fp32",
                   seed: int = 0, val_freq: int = 1, checkpoint_every: int = 0,
                   stop_after_steps: int | None = None, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """DINO's linear evaluation (see the module docstring); resumes from ``out_dir/linear_checkpoint.pth``.

    ``stop_after_steps`` stops (after checkpointing) once that many optimizer steps have run in total,
    for tests and time-boxed runs; rerunning continues. ``identity`` (checkpoint, data...) must match
    the checkpoint's to resume.
    """
    device = torch.device(device)
    amp_dtype_for(precision, device)  # validates before any work
    settings.check_fits(extractor.backbone)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_files = scan_image_folder(train_dir, labeled=True)
    val_files = scan_image_folder(val_dir, labeled=True)
    check_same_classes(train_files.classes, val_files.classes)
    settings_id = {"identity": identity or {}, "layout": extractor.spec.name(), "epochs": epochs, "lr": lr,
                   "batch_size": batch_size, "seed": seed, "image": dataclasses.asdict(settings),
                   "precision": precision, "n_train": len(train_files), "classes": train_files.classes}
    settings_id = json.loads(json.dumps(settings_id))  # tuples -> lists, as stored
    probe = _FaithfulHead(out_dir / "linear_checkpoint.pth", settings_id, extractor.dim, len(train_files.classes),
                          lr * batch_size / 256.0, epochs, seed, device)
    batches = _TrainBatches(ImageFolderDataset(train_files, RandomResizedCropFlip(
        settings.image_size, mean=settings.mean, std=settings.std)), seed, batch_size, num_workers, device)
    from ssl_distill.data.loader import build_eval_loader

    val_loader = build_eval_loader(val_files.root, settings.image_size, settings.resize_size, batch_size,
                                   num_workers, tuple(settings.mean), tuple(settings.std))
    model, amp = prepare_inference(extractor, precision, device)
    model.eval()
    probe.head.train()
    t0 = time.perf_counter()
    state, stopped = probe.state, False
    bad = BadImageCounter(advice=FAITHFUL_ADVICE)  # the training images this process read
    while state["epoch"] < epochs and not stopped:
        stopped = probe.train_epoch(model, amp, batches, checkpoint_every, stop_after_steps, bad)
        if stopped and state["batch"] < batches.n_batches:
            probe.save()
            break
        probe.end_epoch(model, amp, val_loader, epochs, val_freq)
        probe.save()
    last = state["history"][-1] if state["history"] else {}
    done = state["epoch"] >= epochs
    if done:
        atomic_save({"weight": probe.head.weight.detach().cpu(), "bias": probe.head.bias.detach().cpu(),
                     "layout": extractor.spec.name()}, out_dir / "linear_head.pth")
    return {
        "mode": "faithful", "complete": done, "epoch": state["epoch"], "step": state["step"], "epochs": epochs,
        "top1": last.get("top1"), "top5": last.get("top5"),
        "best_top1_over_epochs": state["best_top1"],
        "note": "top1/top5: last evaluated epoch; best_top1_over_epochs is selected on the val set, as DINO reports",
        "history": state["history"], "lr_scaled": lr * batch_size / 256.0, "batch_size": batch_size,
        "layout": extractor.spec.name(), "n_train": len(train_files), "n_test": len(val_files),
        "checkpoint": str(probe.path), "seconds": time.perf_counter() - t0,
    }


class _TrainBatches:
    """The faithful probe's training batches, epoch by epoch, in the order :class:`EpochSampler` draws from
    (seed, epoch); the last partial batch is kept."""

    def __init__(self, dataset: ImageFolderDataset, seed: int, batch_size: int, num_workers: int,
                 device: torch.device) -> None:
        self.dataset, self.batch_size, self.num_workers, self.device = dataset, batch_size, num_workers, device
        self.sampler = EpochSampler(len(dataset), seed, drop_last=False, batch_size=batch_size)
        self.n_batches = -(-len(dataset) // batch_size)

    def remaining(self, epoch: int, batch: int) -> Any:
        """Epoch ``epoch``'s batches from ``batch`` on; none when a checkpoint written on the epoch's last
        step resumes (only the epoch's end, scheduler step and validation, is left to run)."""
        if batch >= self.n_batches:
            return ()
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_batch(batch)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=torch.utils.data.BatchSampler(self.sampler, self.batch_size, drop_last=False),
            collate_fn=collate_eval, num_workers=self.num_workers, pin_memory=self.device.type == "cuda")


class _FaithfulHead:
    """The faithful probe's linear head (N(0, 0.01), bias 0), its SGD and cosine schedule, and its progress
    (``state``: epoch, batch, step, best top-1, history), checkpointed to ``path`` under ``settings``;
    resumed from there when the file exists (the settings must match)."""

    def __init__(self, path: Path, settings: dict[str, Any], in_dim: int, num_classes: int, lr: float,
                 epochs: int, seed: int, device: torch.device) -> None:
        self.path, self.settings, self.device = path, settings, device
        torch.manual_seed(seed)
        self.head = nn.Linear(in_dim, num_classes)
        self.head.weight.data.normal_(mean=0.0, std=0.01)
        self.head.bias.data.zero_()
        self.head.to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr, momentum=0.9, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, epochs, eta_min=0)
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_top1": 0.0, "history": []}
        if path.is_file():
            self._resume()

    def _resume(self) -> None:
        ck = torch.load(self.path, map_location="cpu", weights_only=True)
        if ck.get("format") != FAITHFUL_FORMAT:
            raise CheckpointError(f"{self.path} is not a linear-probe checkpoint")
        if ck["settings"] != self.settings:
            diff = sorted(k for k in self.settings if ck["settings"].get(k) != self.settings[k])
            raise CheckpointError(f"{self.path} was written with other settings ({', '.join(diff)}); "
                                  "use another output directory or delete it")
        self.head.load_state_dict(ck["head"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.state = ck["state"]
        print(f"[linear] resuming from {self.path}: epoch {self.state['epoch']}, batch {self.state['batch']}",
              flush=True)

    def save(self) -> None:
        atomic_save({"format": FAITHFUL_FORMAT, "settings": self.settings, "head": self.head.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "state": self.state}, self.path)

    def train_epoch(self, model: nn.Module, amp: torch.dtype | None, batches: _TrainBatches, checkpoint_every: int,
                    stop_after_steps: int | None, bad: BadImageCounter) -> bool:
        """SGD steps on the rest of the current epoch; True when ``stop_after_steps`` steps are done. ``bad``
        counts the unreadable (substituted) images: above its share, DataError before the batch's step."""
        state, device = self.state, self.device
        for batch in batches.remaining(state["epoch"], state["batch"]):
            bad.update(batch["bad"], len(batch["label"]))
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                f = model(x)
            loss = F.cross_entropy(self.head(f.float()), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            state["batch"] += 1
            state["step"] += 1
            if state["batch"] == batches.n_batches:  # the epoch's last batch: its loss goes into the history
                state["train_loss"] = float(loss.detach())
            if checkpoint_every and state["step"] % checkpoint_every == 0:
                self.save()
            if stop_after_steps is not None and state["step"] >= stop_after_steps:
                return True
        bad.finalize()
        return False

    def end_epoch(self, model: nn.Module, amp: torch.dtype | None, val_loader: Any, epochs: int,
                  val_freq: int) -> None:
        """The schedule's step, the next epoch, and the validation every ``val_freq`` epochs and at the end."""
        state = self.state
        with warnings.catch_warnings():  # resumed at an epoch's end, no optimizer.step() has run in this process
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        state["epoch"] += 1
        state["batch"] = 0
        if state["epoch"] % val_freq == 0 or state["epoch"] == epochs:
            top1, top5, vloss = _evaluate_head(model, self.head, val_loader, self.device, amp)
            state["best_top1"] = max(state["best_top1"], top1)
            state["history"].append({"epoch": state["epoch"], "top1": top1, "top5": top5, "val_loss": vloss,
                                     "train_loss": state.get("train_loss"), "lr": self.optimizer.param_groups[0]["lr"]})
            print(f"[linear] epoch {state['epoch']}/{epochs}: val top-1 {top1:.2f}% top-5 {top5:.2f}% "
                  f"(best top-1 {state['best_top1']:.2f}%)", flush=True)


# ----------------------------------------------------------------------------------------------------
# Checkpoint -> results
# ----------------------------------------------------------------------------------------------------
@dataclass
class ExtractOptions:
    """Image and extraction settings shared by the modes (None: from the run config / defaults)."""

    image_size: int | None = None
    resize_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    batch_size: int = 128
    num_workers: int = 2
    precision: str | None = None  # fp32 | bf16 | fp16; None: the run's knn.precision (fp32 by default)
    device: str = "auto"
    feature_dtype: str = "float32"
    cache_dir: str | None = None  # "" disables the cache; None: <out dir>/features


def _image_settings(loaded: LoadedBackbone, opts: ExtractOptions) -> ImageSettings:
    """Our runs: the run's k-NN image settings and normalization; official files: 224 / 256, ImageNet's."""
    cfg = loaded.config
    ours = loaded.format == "ssl-distill"
    size0, resize0 = (cfg.knn.image_size, cfg.knn.resize_size) if ours else (224, 256)
    size = opts.image_size or size0
    resize = opts.resize_size or (resize0 if opts.image_size is None else max(size, round(size * resize0 / size0)))
    return ImageSettings(image_size=size, resize_size=resize, mean=tuple(opts.mean or cfg.data.crops.mean),
                         std=tuple(opts.std or cfg.data.crops.std))


def linear_on_checkpoint(checkpoint: str | Path, train_dir: str | Path | None = None,
                         val_dir: str | Path | None = None, mode: str = "fast",
                         out: str | Path | None = None, which: str | None = None, key: str | None = None,
                         num_heads: int | None = None, opts: ExtractOptions | None = None,
                         boxes: str | Path | None = None, **mode_kwargs: Any) -> dict[str, Any]:
    """Run a linear probe of ``checkpoint`` (run directory, our file, or an official file).

    ``mode_kwargs`` go to :func:`fast_probe` (``blocks``, ``lrs``, ``epochs``, ``batch_size`` (heads),
    ``holdout``, ``seed``, ``compute``), :func:`faithful_probe` (``epochs``, ``lr``, ``n_last_blocks``,
    ``avgpool``, ``val_freq``, ``checkpoint_every``, ``stop_after_steps``, ``seed``) or
    :func:`logreg_probe` (``cs``, ``holdout``, ``seed``, ``max_iter``, ``layout``, ``n_last_blocks``).
    Results are written to ``out`` (default ``<run dir or checkpoint folder>/linear_<mode>.json``).
    ``train_dir`` / ``val_dir`` default to the run's ``knn.train_dir`` / ``knn.val_dir``. ``boxes`` (logreg
    with the ``obj`` layout): a COCO boxes file name in each folder; each image's [OBJ] reads the patches of its
    boxes (:func:`~ssl_distill.eval.features.view_box_masks`).
    """
    if mode not in ("fast", "faithful", "logreg"):
        raise ValueError(f"mode must be fast, faithful or logreg, got {mode!r}")
    opts = opts or ExtractOptions()
    layout = mode_kwargs.get("layout", "cls") if mode == "logreg" else "cls"
    if boxes is not None and layout != "obj":
        raise ValueError("boxes select the patches ODIS's [OBJ] token reads: they need --mode logreg --layout obj "
                         "(the fast and faithful probes read [CLS] and mean tokens)")
    backbone, loaded = load_model(checkpoint, which, key=key, num_heads=num_heads, obj_token=layout == "obj")
    if note := untrained_cls_note(loaded.config, layout):
        print(f"warning: {note}")
    train_dir = train_dir or loaded.config.knn.train_dir
    val_dir = val_dir or loaded.config.knn.val_dir
    if not train_dir or not val_dir:
        raise ConfigError("a linear probe needs labeled train and val folders: pass --train and --val")
    out = Path(out) if out is not None else default_output(checkpoint, f"linear_{mode}")
    cache_dir = None if opts.cache_dir == "" else Path(opts.cache_dir or out.parent / "features")
    settings = _image_settings(loaded, opts)
    device = resolve_device(opts.device, key="--device")
    dtype = {"float32": torch.float32, "float16": torch.float16}[opts.feature_dtype]
    precision = opts.precision or loaded.config.knn.precision
    header = {"checkpoint": loaded.describe(), "train_dir": str(train_dir), "val_dir": str(val_dir),
              "image": dataclasses.asdict(settings), "precision": precision,
              **({} if boxes is None else {"boxes": str(boxes)})}
    extract = functools.partial(extract_train_val, train_dir=train_dir, val_dir=val_dir, settings=settings,
                                cache_dir=cache_dir, device=device, precision=precision, batch_size=opts.batch_size,
                                num_workers=opts.num_workers, dtype=dtype, boxes=boxes)
    t0 = time.perf_counter()
    if mode == "fast":
        res = _fast_mode(backbone, extract, out.with_name(out.stem + "_best_head.pth"), device=device, **mode_kwargs)
    elif mode == "logreg":
        res = _logreg_mode(backbone, extract, **mode_kwargs)
    else:
        n_last = min(int(mode_kwargs.pop("n_last_blocks", 4)), backbone.depth)
        spec = _faithful_layout(n_last, bool(mode_kwargs.pop("avgpool", False)))
        identity = {"checkpoint": str(loaded.file), "source": loaded.source, "train": str(train_dir),
                    "val": str(val_dir)}
        res = faithful_probe(FeatureExtractor(backbone, spec), train_dir, val_dir,
                             out.with_name(out.stem + "_run"), settings, batch_size=opts.batch_size,
                             num_workers=opts.num_workers, device=device, precision=precision,
                             identity=identity, **mode_kwargs)
    res = {**header, **res, "seconds_total": time.perf_counter() - t0}
    write_results(res, out)
    res["out"] = str(out)
    return res


#: extractor -> (train, test) features of the probe's folders (extract_train_val with the probe's settings)
_Extract = Callable[[FeatureExtractor], tuple[FeatureSet, FeatureSet]]


def _fast_mode(backbone: TokenBackbone, extract: _Extract, head_file: Path, blocks: Sequence[int] = (1, 4),
               lrs: Sequence[float] = LR_GRID, **kwargs: Any) -> dict[str, Any]:
    """:func:`fast_probe` of the grid over ``blocks`` (clipped to the depth) x mean token or not x ``lrs``, on
    the features of the largest block count; the best head is written to ``head_file``."""
    blocks = tuple(sorted(set(min(int(b), backbone.depth) for b in blocks)))
    max_blocks = max(blocks)
    train, test = extract(FeatureExtractor(backbone, FeatureSpec("cls+mean", max_blocks)))
    res = fast_probe(train, test, backbone.embed_dim, max_blocks, head_grid(blocks, (False, True), tuple(lrs)),
                     **kwargs)
    atomic_save(res.pop("best_head_state"), head_file)
    res["best_head_file"] = str(head_file)
    res["features"] = {"train": _meta(train), "test": _meta(test)}
    return res


def _logreg_mode(backbone: TokenBackbone, extract: _Extract, n_last_blocks: int = 1, layout: str = "cls",
                 **kwargs: Any) -> dict[str, Any]:
    """:func:`logreg_probe` on the ``layout`` features of the last ``n_last_blocks`` blocks (clipped to the depth)."""
    spec = FeatureSpec(layout, min(int(n_last_blocks), backbone.depth))
    train, test = extract(FeatureExtractor(backbone, spec))
    res = logreg_probe(train, test, **kwargs)
    res["layout"] = spec.name()
    res["features"] = {"train": _meta(train), "test": _meta(test)}
    return res


def _meta(fs: FeatureSet) -> dict[str, Any]:
    keep = ("n", "layout", "n_last_blocks", "key", "seconds", "images_per_s", "cache_file", "bad_images",
            "images_reading_every_patch")
    return {**{k: fs.meta[k] for k in keep if k in fs.meta}, "cached": fs.cached}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    opts = ExtractOptions(
        image_size=args.image_size, resize_size=args.resize_size,
        mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None,
        batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision, device=args.device,
        feature_dtype=args.feature_dtype, cache_dir="" if args.no_cache else args.cache_dir,
    )
    if args.mode == "fast":
        kw: dict[str, Any] = dict(blocks=args.blocks, lrs=args.lrs, epochs=args.epochs,
                                  batch_size=args.head_batch_size, holdout=args.holdout, seed=args.seed,
                                  compute=args.head_precision, standardize=args.standardize)
    elif args.mode == "faithful":
        kw = dict(epochs=args.epochs or 100, lr=args.lr, n_last_blocks=args.n_last_blocks or 4, avgpool=args.avgpool,
                  val_freq=args.val_freq, checkpoint_every=args.checkpoint_every,
                  stop_after_steps=args.stop_after_steps, seed=args.seed)
    else:
        kw = dict(cs=args.cs, holdout=args.holdout, seed=args.seed, max_iter=args.max_iter, layout=args.layout,
                  n_last_blocks=(args.n_last_blocks or 1) if args.layout in ("cls", "cls+mean", "obj") else 1)
    res = linear_on_checkpoint(args.checkpoint, args.train, args.val, mode=args.mode, out=args.out,
                               which=args.which, key=args.key, num_heads=args.num_heads, opts=opts,
                               boxes=args.boxes, **kw)
    if args.mode == "fast":
        b = res["best"]
        print(f"linear (fast, {res['n_heads']} heads): best {b['name']} (held-out top-1 {b['holdout_top1']:.2f}%) "
              f"-> test top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
        if res["best_lr_at_grid_edge"]:
            print(f"note: the chosen lr is the {'largest' if res['best_lr_at_grid_edge'] == 'high' else 'smallest'} "
                  "of the grid; the optimum may lie outside it (--lrs to extend it; --standardize conditions SGD)")
    elif args.mode == "logreg":
        print(f"linear (logreg, C={res['best']['C']:g}): test top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
        if res["best_C_at_grid_edge"] or not res["best"]["refit_converged"]:
            print(f"note: C={res['best']['C']:g} " + ("is on the edge of the --cs grid" if res["best_C_at_grid_edge"]
                                                      else "was selected") +
                  ("" if res["best"]["refit_converged"] else f"; the refit did not converge in --max-iter {args.max_iter}"))
    elif res["complete"]:
        print(f"linear (faithful, {res['epochs']} epochs): val top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}% "
              f"(best over epochs {res['best_top1_over_epochs']:.2f}%)")
    else:
        print(f"linear (faithful): stopped at epoch {res['epoch']} step {res['step']}; run again to continue")
    print(f"results: {res['out']}")
    return 0


main = tool_main("linear", add_arguments, run)  # python -m ssl_distill.eval.linear


if __name__ == "__main__":
    raise SystemExit(main())
