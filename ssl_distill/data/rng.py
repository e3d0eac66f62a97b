"""Counter-based randomness: every random number is a pure function of its keys.

A uniform is ``f(sample seed, stream, key, counter)`` (:func:`counter_uniforms`, a SplitMix64-style
counter-based generator), so a sample's crops, photometric parameters and masks depend only on its
seed: not on the batch it lands in, the number of workers, or the process. Sample seeds are
themselves a function of ``(run seed, epoch, dataset index)`` (:func:`sample_seed`, drawn by
:class:`~ssl_distill.data.sampler.EpochSampler`).

:class:`Stream` is the one table of stream numbers: each consumer draws on its own, so turning one
on (masks, object crops) never moves another's numbers.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1  # sample seeds lie in [0, 2**63): they fit an int64 tensor
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_REFILL = 64  # uniforms computed at least per refill of a uniform_stream


class Stream(IntEnum):
    """The stream numbers of every random draw in the tree, one per consumer."""

    GEOMETRY = 1  # data.views: each view's crop box and flip
    PHOTOMETRIC = 2  # data.photometric: each view's jitter, grayscale, blur and solarize parameters
    SAMPLER = 3  # data.rng.sample_seed: the per-sample seeds the epoch sampler hands out
    MASK_RATIO = 4  # data.masking: each global view's iBOT mask ratio
    MASK_SHAPE = 5  # data.masking: the iBOT block / random mask of each global view
    OBJECT_CROPS = 6  # data.object_crops: the object-aware crops' tries after the plain draw
    LINEAR_PROBE = 7  # eval.linear: the linear probe's random resized crop and flip
    ATTMASK = 0xA77  # engine.masks: AttMask's torch generator, SeedSequence((run seed, step, rank, ATTMASK))


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _as_uint64(values: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return np.array([int(v) & _MASK64 for v in np.asarray(values).reshape(-1).tolist()], dtype=np.uint64)


def counter_uniforms(seeds: Sequence[int] | np.ndarray | torch.Tensor, stream: int, view: int | Sequence[int],
                     n: int) -> np.ndarray:
    """Uniform numbers in [0, 1) that depend only on ``(seed, stream, view, k)``.

    Args:
        seeds: B integer seeds.
        stream: which consumer (a :class:`Stream`) so streams never overlap.
        view: view index (or any second key), or a sequence of V of them.
        n: numbers per (seed, view).

    Returns:
        float64 array (B, n), or (B, V, n) when ``view`` is a sequence.
    """
    s = _as_uint64(seeds)
    views = np.atleast_1d(np.asarray(view, dtype=np.int64)).astype(np.uint64)
    with np.errstate(over="ignore"):
        salt = _mix64((np.uint64(stream & 0xFFFFFFFF) << np.uint64(32)) | (views & np.uint64(0xFFFFFFFF)))  # (V,)
        key = _mix64(s[:, None] ^ salt[None, :])  # (B, V)
        counters = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(key[:, :, None] + counters)  # (B, V, n)
    u = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u[:, 0] if np.ndim(view) == 0 else u


def uniform_stream(seed: int, stream: int, key: int, first: np.ndarray | None = None) -> Callable[[], float]:
    """A ``draw()`` returning the uniforms ``u_1, u_2, ...`` of one ``(seed, stream, key)`` in turn.

    Value k is ``counter_uniforms([seed], stream, key, n)[0, k - 1]`` for any ``n >= k``: a pure
    function of the key and the position, however many are read. ``first``: those values already
    drawn for the batch (any number of them).
    """

    def values() -> Iterator[float]:
        done = list(first.tolist()) if first is not None else []
        yield from done
        n = len(done)
        while True:
            more = counter_uniforms([seed], stream, key, max(2 * n, _REFILL))[0, n:].tolist()
            yield from more
            n += len(more)

    return values().__next__


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic per-sample seed in [0, 2**63) from (run seed, epoch, dataset index)."""
    with np.errstate(over="ignore"):
        z = _mix64(_as_uint64([seed]) + _GOLDEN * np.uint64(Stream.SAMPLER))
        z = _mix64(z ^ _as_uint64([epoch]))
        z = _mix64(z + _GOLDEN * _as_uint64([index]))
    return int(z[0]) & MASK63


def sample_seeds(seed: int, epoch: int, indices: torch.Tensor) -> list[int]:
    """Vectorized :func:`sample_seed` for many indices: int64 (N,) -> N seeds."""
    with np.errstate(over="ignore"):
        z = _mix64(_as_uint64([seed]) + _GOLDEN * np.uint64(Stream.SAMPLER))
        z = _mix64(z ^ _as_uint64([epoch]))
        z = _mix64(z + _GOLDEN * indices.numpy().astype(np.uint64))
    return (z & np.uint64(MASK63)).astype(np.int64).tolist()
