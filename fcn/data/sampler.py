"""The training sampler: a per-epoch shuffle that can resume mid-epoch, and per-sample seeds.

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so a run resumed at
batch ``b`` of epoch ``e`` sees exactly the samples an uninterrupted run would. Each index comes
with its own augmentation seed (see :func:`fcn.rng.sample_seed`), which makes augmentation
independent of the number of loader workers and of where the run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from fcn.rng import sample_seed


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation_seed)`` for one epoch, starting at ``start`` samples in.

    Args:
        num_samples: dataset length.
        seed: the run's seed.
        shuffle: permute each epoch (False keeps dataset order).
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 1
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch to draw, and how many of its samples were already consumed."""
        self.epoch = epoch
        self.start = start

    def order(self) -> list[int]:
        """This epoch's full order of dataset indices."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order()[self.start :]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples - self.start
