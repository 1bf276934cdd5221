"""The training sampler: a per-epoch shuffle that can resume mid-epoch, split between the ranks of
a job, and per-sample seeds.

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so a run resumed at
batch ``b`` of epoch ``e`` sees exactly the samples an uninterrupted run would. Each index comes
with its own augmentation seed (see :func:`fcn.rng.sample_seed`), which makes augmentation
independent of the number of loader workers, of where the run was resumed, and of which rank
draws the sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from fcn.rng import sample_seed


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation_seed)`` for one epoch, starting at ``start`` samples in.

    With ``world_size`` > 1 each rank takes every ``world_size``-th index of the epoch's order,
    from ``rank`` on, as ``DistributedSampler`` does: the order is first padded with its own
    first indices to a multiple of ``world_size``, so every rank draws the same number of
    samples (and takes the same number of steps). Rank ``r``'s batch ``i`` of size ``b`` then
    holds exactly the samples that a single process with batch ``world_size * b`` has in its
    batch ``i``.

    Args:
        num_samples: dataset length.
        seed: the run's seed.
        shuffle: permute each epoch (False keeps dataset order).
        rank: this process's rank in the job.
        world_size: number of processes in the job.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 1
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch to draw, and how many of this rank's samples of it were already consumed."""
        self.epoch = epoch
        self.start = start

    def order(self) -> list[int]:
        """This epoch's full order of dataset indices (all ranks together)."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def shard(self) -> list[int]:
        """This rank's part of the epoch's order."""
        order = self.order()
        total = self.per_rank * self.world_size
        if total > len(order) and order:
            order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.shard()[self.start :]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.per_rank - self.start
