"""The epoch sampler: which images each rank sees in which order, and each sample's seed.

An epoch's order is a seeded permutation (resumable mid-epoch), and every index comes with its
sample seed (:func:`~ssl_distill.data.rng.sample_seed` of run seed, epoch and index), from which the
views, photometric parameters and masks of that sample are drawn.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ssl_distill.data.rng import sample_seeds


class EpochSampler(torch.utils.data.Sampler):
    """Seeded per-epoch shuffling, sharded over ranks, resumable mid-epoch.

    Yields ``(index, sample_seed)`` tuples, or ``(index, sample_seed, epoch)`` with
    ``with_epoch=True`` (``ImageFolderDataset`` accepts both; the epoch rides along with each index
    so that workers, persistent or not, see the current one). Epoch ``e``
    shuffles with ``torch.randperm(n, generator=seeded(seed + e))``; the permutation is trimmed
    (``drop_last=True``) or padded by wrapping (``drop_last=False``) to a multiple of
    ``world_size`` and rank ``r`` takes positions ``r, r + world_size, ...`` (as
    ``DistributedSampler``). ``sample_seed = sample_seed(seed, epoch, index)``.

    Wrap it in ``torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)``.
    ``set_epoch(e)`` selects the epoch and resets the start batch to 0; ``set_start_batch(k)``
    (call after ``set_epoch``) skips the first ``k * batch_size`` samples of this rank, i.e. the
    first ``k`` batches. ``len(sampler)`` counts the samples still to be yielded this epoch;
    ``batches_per_epoch`` is the full count of (drop_last) batches, for schedules.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True, *,
                 batch_size: int, with_epoch: bool = False) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.seed, self.rank, self.world_size = int(n), int(seed), int(rank), int(world_size)
        self.drop_last, self.batch_size = bool(drop_last), int(batch_size)
        self.with_epoch = bool(with_epoch)
        self.per_rank = n // world_size if drop_last else -(-n // world_size)
        if self.per_rank < 1:
            raise ValueError(f"{n} samples cannot be split over {world_size} ranks with drop_last=True")
        if drop_last and self.per_rank < batch_size:
            raise ValueError(f"{self.per_rank} samples per rank is less than one batch of {batch_size}")
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch on this rank (the BatchSampler's length with drop_last=True)."""
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start_batch = 0

    def set_start_batch(self, k: int) -> None:
        if not 0 <= k <= self.batches_per_epoch:
            raise ValueError(f"start batch {k} outside [0, {self.batches_per_epoch}]")
        self.start_batch = int(k)

    def indices(self) -> torch.Tensor:
        """This rank's full index list for the current epoch, (per_rank,) int64."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        total = self.per_rank * self.world_size
        if total > self.n:
            perm = torch.cat([perm, perm.repeat(-(-(total - self.n) // self.n))[: total - self.n]])
        return perm[:total][self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int] | tuple[int, int, int]]:
        idx = self.indices()[self.start_batch * self.batch_size :]
        if self.with_epoch:
            return iter(zip(idx.tolist(), sample_seeds(self.seed, self.epoch, idx), [self.epoch] * len(idx)))
        return iter(zip(idx.tolist(), sample_seeds(self.seed, self.epoch, idx)))
