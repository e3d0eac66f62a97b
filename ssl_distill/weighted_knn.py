"""Weighted k-NN classification of frozen features (Wu et al. 2018, as used by DINO, Caron et al. 2021): the
neighbour search and the vote every k-NN evaluation runs (``ssl-distill knn``, object-knn, the online k-NN).

Protocol (DINO's ``eval_knn.py`` / ``knn_classifier``):

- train and test features are L2-normalized (in float32, whatever the input dtype);
  the similarity is the cosine = inner product of normalized features;
- the ``k`` most similar train features vote for their class with weight ``exp(sim / T)``, ``T = 0.07``;
  the class score is the sum of the weights of its voters;
- top-1: the highest-scoring class is the label; top-5: the label is among the ``min(5, k, C)``
  highest-scoring classes (``min(5, k)`` as DINO, and over all ``C`` classes when ``C < 5``).

Implementation notes:

- One nearest-neighbour search with ``k_max = max(ks)`` serves every ``k``: neighbours come back sorted by
  decreasing similarity, so the ``k`` nearest are the first ``k`` columns.
- Engine ``"faiss"`` (default): exact inner-product search with ``faiss.IndexFlatIP`` on CPU (BLAS similarity
  blocks + heap selection). Engine ``"torch"``: exact float32 ``torch.mm`` in query chunks + ``torch.topk``,
  on the features' device (the fast choice on a GPU). Both are exact float32 searches; they may order two
  train items differently only when their similarities agree to ~1e-7 (different summation order).
- Ties between class scores: the scores are ranked with ``scores.sort(dim=1, descending=True)``, the
  same call DINO's ``knn_classifier`` makes, so tied classes come out in whatever order torch's sort
  gives (on CPU in practice: the lower class index first for small class counts; unspecified for large
  ones, where tied classes are mostly the zero-score classes that only top-5 can reach). Class scores
  are accumulated with ``scatter_add`` in neighbour order, which can differ from DINO's one-hot sum in
  the last bit; that only matters for two non-zero class scores that are equal to ~1e-7.
- ``k > N`` (fewer train items than ``k``) is clipped to ``N``; the entry keeps its requested name
  (``"k=200"``) and records the ``k`` actually used under ``"k"``.
- Self-matches: train and test are treated as separate sets and nothing is excluded; a test item that is
  also in the train set finds itself at similarity 1 (as in DINO, where train and val are disjoint).
- Several temperatures: the vote weights are recomputed from the same neighbours for every ``T``; the
  first temperature gives the ``"k=<k>"`` entries, the others ``"k=<k>,T=<T>"``.
- Bounded memory (``train_chunk``): the search walks the train set in chunks of ``train_chunk`` rows,
  normalizing each chunk to float32 on the fly and merging the running top-``k``; nothing of size
  ``N x D`` in float32 is ever made (features can stay float16), and the similarity blocks are
  ``query_chunk x train_chunk``. Same exact float32 similarities as the other engines.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ENGINES", "class_scores", "knn_classify", "search_neighbours", "search_neighbours_chunked"]

ENGINES = ("faiss", "torch")


def _normalize(x: Tensor) -> Tensor:
    """(N, D) any float dtype -> (N, D) float32, rows of unit L2 norm (zero rows stay zero)."""
    return F.normalize(x.float(), p=2, dim=1).contiguous()


def search_neighbours(
    train_feats: Tensor,
    test_feats: Tensor,
    k: int,
    engine: str = "faiss",
    query_chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner-product search.

    Args:
        train_feats: (N, D) float32 (already normalized for cosine).
        test_feats: (M, D) float32.
        k: neighbours per query, ``1 <= k <= N``.
        engine: ``"faiss"`` (CPU, ``IndexFlatIP``) or ``"torch"`` (``mm`` + ``topk`` on the features' device).
        query_chunk: queries per similarity block for the torch engine (memory ~ ``query_chunk * N`` floats);
            faiss blocks internally.

    Returns:
        sims: (M, k) float32, sorted by decreasing similarity.
        idx: (M, k) int64 indices into the train set. Both on the train features' device
            (CPU for faiss).
    """
    n = train_feats.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if engine == "faiss":
        train_np = np.ascontiguousarray(train_feats.detach().float().cpu().numpy())
        test_np = np.ascontiguousarray(test_feats.detach().float().cpu().numpy())
        index = faiss.IndexFlatIP(train_np.shape[1])
        index.add(train_np)
        sims, idx = index.search(test_np, k)
        return torch.from_numpy(sims), torch.from_numpy(idx)
    if engine == "torch":
        test_feats = test_feats.to(train_feats.device)
        sims_out, idx_out = [], []
        train_t = train_feats.t()
        for start in range(0, test_feats.shape[0], query_chunk):
            sim = torch.mm(test_feats[start : start + query_chunk], train_t)  # (B, N)
            s, i = sim.topk(k, dim=1, largest=True, sorted=True)
            sims_out.append(s)
            idx_out.append(i)
        if not sims_out:
            return train_feats.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=train_feats.device)
        return torch.cat(sims_out), torch.cat(idx_out)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def search_neighbours_chunked(
    train_feats: Tensor,
    test_feats: Tensor,
    k: int,
    query_chunk: int = 1024,
    train_chunk: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Exact cosine top-``k`` with bounded memory: raw (unnormalized, any float dtype) features in.

    Each train chunk is normalized to float32 when used; each query chunk keeps a running top-``k``.
    Returns (M, k) float32 similarities (decreasing) and int64 train indices, on the train features' device.
    """
    n = train_feats.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if query_chunk < 1 or train_chunk < 1:
        raise ValueError("query_chunk and train_chunk must be positive")
    device = train_feats.device
    sims_out, idx_out = [], []
    for qs in range(0, test_feats.shape[0], query_chunk):
        q = _normalize(test_feats[qs : qs + query_chunk].to(device))
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        for ts in range(0, n, train_chunk):
            t = _normalize(train_feats[ts : ts + train_chunk])
            if not torch.isfinite(t).all():
                raise ValueError("features contain NaN or inf")
            s, i = torch.mm(q, t.t()).topk(min(k, t.shape[0]), dim=1, largest=True, sorted=True)
            best_s, order = torch.cat([best_s, s], dim=1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + ts], dim=1).gather(1, order)
        sims_out.append(best_s)
        idx_out.append(best_i)
    if not sims_out:
        return torch.zeros(0, k, device=device), torch.zeros(0, k, dtype=torch.long, device=device)
    return torch.cat(sims_out), torch.cat(idx_out)


def class_scores(sims: Tensor, neighbour_labels: Tensor, temperature: float, num_classes: int) -> Tensor:
    """Weighted votes: ``score[m, c] = sum_j [label_j == c] * exp(sim_j / T)`` over the given neighbours.

    Args:
        sims: (M, k) similarities of the k neighbours.
        neighbour_labels: (M, k) int64 class of each neighbour.
    Returns:
        (M, C) float32 class scores.
    """
    weights = (sims.float() / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def _check_inputs(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, ks: Sequence[int]
) -> None:
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D); got {tuple(train_feats.shape)}, {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise ValueError("labels must be (N,) and (M,) matching the features")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("the train and test sets must not be empty")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    for name, lab in (("train", train_labels), ("test", test_labels)):
        if lab.is_floating_point() or lab.is_complex():
            raise ValueError(f"{name} labels must be integer class indices, got {lab.dtype}")
        if lab.numel() and int(lab.min()) < 0:
            raise ValueError(f"{name} labels must be >= 0 (unlabeled data, label -1, cannot be evaluated by k-NN)")


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float | Sequence[float] = 0.07,
    num_classes: int | None = None,
    query_chunk: int = 1024,
    engine: str = "faiss",
    train_chunk: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Weighted k-NN accuracy of ``test`` against ``train`` for every ``k`` in ``ks`` (one search).

    Args:
        train_feats: (N, D) float32 / float16 / bfloat16; normalized here in float32.
        train_labels: (N,) int64 class indices ``>= 0``.
        test_feats: (M, D).
        test_labels: (M,) int64.
        ks: neighbour counts; each ``k > N`` is clipped to ``N``.
        temperature: ``T`` in the vote weight ``exp(sim / T)``, or several: the first one gives the
            ``"k=.."`` entries, each other one ``"k=..,T=.."`` entries (same neighbours, one search).
        num_classes: ``C``; default ``max(label) + 1`` over train and test labels.
        query_chunk: queries per block (torch engine similarity blocks; vote blocks for both engines).
        engine: ``"faiss"`` (default) or ``"torch"``; see the module docstring.
        train_chunk: if set, search with :func:`search_neighbours_chunked` (bounded memory, features
            kept in their dtype) whatever the engine.

    Returns:
        ``{"k=10": {"top1": %, "top5": %, "k": k_used, "per_class": [top-1 % per class, None when the
        class has no test item]}, "k=20": {...}, ...}`` with one entry per ``k`` in ``ks``.
    """
    _check_inputs(train_feats, train_labels, test_feats, test_labels, ks)
    temps = [float(temperature)] if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    if not temps or not all(t > 0 for t in temps):
        raise ValueError(f"temperatures must be > 0, got {temperature}")
    train_labels, test_labels = train_labels.long(), test_labels.long()
    n, m = train_feats.shape[0], test_feats.shape[0]  # m > 0 (checked)
    max_label = int(max(train_labels.max(), test_labels.max()))
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"label {max_label} out of range for num_classes={num_classes}")
    sims, idx = _nearest(train_feats, test_feats, min(max(ks), n), engine, query_chunk, train_chunk)
    neighbour_labels = train_labels.to(idx.device)[idx]  # (M, k_max)
    targets = test_labels.to(idx.device)

    results: dict[str, dict[str, Any]] = {}
    for t_index, temperature in enumerate(temps):
        for key, entry in _vote(sims, neighbour_labels, targets, ks, n, m, temperature, num_classes,
                                query_chunk).items():
            results[key if t_index == 0 else f"{key},T={temperature:g}"] = entry
    return results


def _nearest(train_feats: Tensor, test_feats: Tensor, k: int, engine: str, query_chunk: int,
             train_chunk: int | None) -> tuple[Tensor, Tensor]:
    """(M, k) cosine similarities and train indices of the test rows' ``k`` nearest train rows: one search,
    :func:`search_neighbours` on normalized features, or :func:`search_neighbours_chunked` with ``train_chunk``.
    ValueError on a NaN or infinite feature."""
    if train_chunk is not None:
        if not torch.isfinite(test_feats).all():
            raise ValueError("features contain NaN or inf")
        return search_neighbours_chunked(train_feats, test_feats, k, query_chunk, train_chunk)
    train = _normalize(train_feats)
    test = _normalize(test_feats)
    if not (torch.isfinite(train).all() and torch.isfinite(test).all()):
        raise ValueError("features contain NaN or inf")
    return search_neighbours(train, test, k, engine=engine, query_chunk=query_chunk)


def _vote(sims: Tensor, neighbour_labels: Tensor, targets: Tensor, ks: Sequence[int], n: int, m: int,
          temperature: float, num_classes: int, query_chunk: int) -> dict[str, dict[str, Any]]:
    """Top-1 / top-5 / per-class accuracy of weighted votes among the first k neighbours, for each k."""
    idx_device = sims.device
    results: dict[str, dict[str, Any]] = {}
    for k in ks:
        k_used = min(int(k), n)
        n_top5 = min(5, k_used, num_classes)
        correct1 = torch.zeros(m, dtype=torch.bool, device=idx_device)
        correct5 = torch.zeros(m, dtype=torch.bool, device=idx_device)
        for start in range(0, m, query_chunk):
            stop = min(start + query_chunk, m)
            block = slice(start, stop)
            scores = class_scores(sims[block, :k_used], neighbour_labels[block, :k_used], temperature, num_classes)
            _, ranked = scores.sort(dim=1, descending=True)  # the call DINO's knn_classifier makes
            hit = ranked[:, :n_top5] == targets[start:stop, None]
            correct1[start:stop] = hit[:, 0]
            correct5[start:stop] = hit.any(dim=1)
        results[f"k={k}"] = {
            "top1": 100.0 * int(correct1.sum()) / m,
            "top5": 100.0 * int(correct5.sum()) / m,
            "k": k_used,
            "per_class": _per_class(correct1.cpu(), targets.cpu(), num_classes),
            "temperature": temperature,
        }
    return results


def _per_class(correct: Tensor, targets: Tensor, num_classes: int) -> list[float | None]:
    """(M,) bool, (M,) int64 -> top-1 % per class, ``None`` for classes without test items."""
    total = torch.bincount(targets, minlength=num_classes)
    good = torch.bincount(targets, weights=correct.double(), minlength=num_classes)
    return [100.0 * float(g) / int(t) if int(t) else None for g, t in zip(good.tolist(), total.tolist())]
