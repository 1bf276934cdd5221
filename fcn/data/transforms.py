"""Augmentation presets (albumentations) and normalisation on the device.

Images travel from disk to the device as uint8 (four times less to copy than float32) and are
normalised there by :func:`normalize`. Masks are only ever resized with centre-aligned nearest
neighbour (``INTER_NEAREST_EXACT``: the pixel-centre convention of the image's bilinear resize) and
padded with ``ignore_index``, so padding never counts as a class.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch


def train_transforms(
    *,
    crop_size: int | Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    ignore_index: int = 255,
) -> A.Compose:
    """Random scale, random crop (padding with ``ignore_index`` where the image is smaller),
    horizontal flip and colour jitter.

    Args:
        crop_size: side of the square crop, or ``(height, width)``.
        scale_range: ``(min, max)`` factor of the random rescale; ``(1, 1)`` turns it off.
        hflip: probability of a horizontal flip.
        color_jitter: strength of brightness, contrast and saturation jitter (0 turns it off).
        ignore_index: mask value written into padded pixels.
    """
    height, width = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    low, high = scale_range
    steps: list[A.BasicTransform] = []
    if (low, high) != (1, 1):
        steps.append(
            A.RandomScale(
                scale_limit=(low - 1, high - 1),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST_EXACT,  # centre-aligned, as the bilinear image resize
                p=1.0,
            )
        )
    steps.append(
        A.RandomCrop(
            height,
            width,
            pad_if_needed=True,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        )
    )
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color_jitter > 0:
        j = color_jitter
        steps.append(
            A.ColorJitter(
                brightness=(1 - j, 1 + j), contrast=(1 - j, 1 + j), saturation=(1 - j, 1 + j), hue=(0, 0), p=0.8
            )
        )
    return A.Compose(steps)


def reseed(transform: A.Compose, seed: int) -> None:
    """Seed an albumentations pipeline for one sample: all steps draw, in turn, from one stream.

    ``Compose.set_random_seed`` would give every step its own generator with the same seed, tying
    (say) the flip decision to the scale factor; one shared stream keeps the draws independent,
    and costs a quarter of the time (this runs for every training sample).
    """
    generator = np.random.default_rng(seed)
    py_random = random.Random(seed)
    for step in (transform, *transform.transforms):
        step.random_generator = generator
        step.py_random = py_random


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Turn a uint8 ``N x 3 x H x W`` batch into float, scaled to [0, 1] then standardised."""
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t
