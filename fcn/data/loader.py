"""Batching: a collate function that pads to the largest image, and the DataLoader settings."""

from __future__ import annotations

import functools
import itertools
import logging
import signal
import threading

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
from fcn.rng import seed_worker
from fcn.signals import STOP_SIGNALS, blocked, protect_worker, stopping

log = logging.getLogger(__name__)


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]], ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, mask)`` items, padding bottom and right to the largest size in the batch.

    Images are padded with 0 and masks with ``ignore_index``, so evaluation at each image's
    original resolution can still batch images of different sizes: the padding is never scored.
    """
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    if all(image.shape[-2:] == (height, width) for image, _ in batch):  # training crops: nothing to pad
        return torch.stack([image for image, _ in batch]), torch.stack([mask for _, mask in batch])
    images, masks = [], []
    for image, mask in batch:
        pad = (0, width - image.shape[-1], 0, height - image.shape[-2])
        images.append(F.pad(image, pad, value=0))
        masks.append(F.pad(mask, pad, value=ignore_index))
    return torch.stack(images), torch.stack(masks)


class _PadCollate:
    # A class, not a lambda, so worker processes can pickle it.
    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, batch):
        return pad_collate(batch, self.ignore_index)


def _init_worker(worker_id: int, max_image_pixels: int | None = PILLOW_DEFAULT) -> None:
    # Ctrl-C, SIGTERM (schedulers, docker stop) and SIGHUP reach the whole process group. Workers
    # leave them to the main process, which finishes its step and saves; a worker dying of one
    # first would end the run with an error and no checkpoint.
    protect_worker()
    set_max_image_pixels(max_image_pixels)  # a spawned worker starts with Pillow's default, not the setting
    seed_worker(worker_id)


class _Loader(DataLoader):
    """A DataLoader whose workers a stop signal to the process group never turns into a crash.

    Workers start with the stop signals blocked (a fork copies the mask) until :func:`protect_worker`
    has set them: the group's SIGTERM sent while a worker starts (every epoch without persistent
    workers) would otherwise kill it and end the run with "DataLoader worker ... killed by signal".
    A worker killed by a stop signal while this process is stopping (a second SIGTERM to the group)
    is part of the stop, not a crash: the pass goes on in this process, from the batch the workers
    did not deliver, so the step in flight (or the validation) ends as it would have.
    """

    @property
    def _index_sampler(self):
        return _Drawn(super()._index_sampler)  # the iterator keeps it: the batches it has drawn

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        with blocked():
            iterator = super()._get_iterator()
        _tolerate_stopped_workers()  # torch has installed its SIGCHLD handler by now
        return iterator

    def __iter__(self):
        iterator = super().__iter__()
        return iterator if self.num_workers == 0 else self._batches(iterator)

    def _batches(self, iterator):
        delivered = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError:
                if not _stopped_by_signal(iterator):
                    raise
                break
            delivered += 1
            yield batch
        log.warning("DataLoader workers stopped by the signal: the stop finishes loading in the main process")
        iterator._shutdown_workers()
        self._iterator = None  # persistent workers: a later pass starts new ones
        drawn = iterator._index_sampler
        for indices in itertools.chain(drawn.batches_drawn[delivered:], iterator._sampler_iter):
            yield self.collate_fn([self.dataset[i] for i in indices])


class _Drawn:
    # The batches of indices an iterator has drawn so far in this pass (for _Loader._batches).
    def __init__(self, batches) -> None:
        self.batches, self.batches_drawn = batches, []

    def __iter__(self):
        self.batches_drawn = []
        for indices in self.batches:
            self.batches_drawn.append(indices)
            yield indices

    def __len__(self) -> int:
        return len(self.batches)


def _stopped_by_signal(iterator) -> bool:
    # Some worker died of a stop signal, none of anything else, and this process is stopping.
    codes = [w.exitcode for w in iterator._workers if not w.is_alive()]
    by_stop_signal = [c for c in codes if c is not None and -c in STOP_SIGNALS]
    return bool(by_stop_signal) and len(by_stop_signal) == len(codes) and stopping(grace_s=1.0)


def _tolerate_stopped_workers() -> None:
    """Wrap torch's SIGCHLD handler (which raises "DataLoader worker ... killed by signal" wherever
    the main process is): a worker's death by a stop signal while this process is stopping is left
    to :meth:`_Loader._batches`, which finishes the pass."""
    if threading.current_thread() is not threading.main_thread():
        return  # torch installs no handler there either
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler) or getattr(torch_handler, "fcn_tolerant", False):
        return

    def handler(signum, frame) -> None:
        try:
            torch_handler(signum, frame)
        except RuntimeError as exc:
            names = [signal.strsignal(s) for s in STOP_SIGNALS]
            if not any(f"killed by signal: {name}" in str(exc) for name in names) or not stopping(grace_s=1.0):
                raise

    handler.fcn_tolerant = True
    signal.signal(signal.SIGCHLD, handler)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    ignore_index: int,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    seed: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = True,
    persistent_workers: bool = True,
) -> DataLoader:
    """A DataLoader over ``sampler`` (dataset order when None), padding batches with
    :func:`pad_collate`, with pinned memory and persistent workers where they help and workers
    seeded from ``seed``."""
    return _Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_PadCollate(ignore_index),
        pin_memory=pin_memory and torch.cuda.is_available(),  # page-locked: faster, async host-to-GPU copies
        persistent_workers=persistent_workers and num_workers > 0,  # no worker start-up every epoch
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=functools.partial(_init_worker, max_image_pixels=Image.MAX_IMAGE_PIXELS),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,  # batches each worker loads ahead
    )


def short_batch_warnings(batch_size: int, train_images: int, val_images: int, val_batch_size: int) -> list[str]:
    """Warnings for a batch size larger than a split (images per process): the DataLoader then gives
    one smaller batch per epoch without a word, so the run would not train on the batch size asked for.

    Returns the lines to log (empty when both splits fill their batches).
    """
    lines = []
    if 0 < train_images < batch_size:
        lines.append(
            f"trainer.batch_size={batch_size} is larger than the {train_images} training images (per process): "
            f"every step trains on a batch of {train_images}; set trainer.batch_size={train_images} to say so, or "
            "add images"
        )
    if 0 < val_images < val_batch_size:
        lines.append(
            f"validation batches hold the {val_images} val images, fewer than trainer.batch_size={val_batch_size} "
            "(scores are the same; only memory use differs)"
        )
    return lines
