"""Full-resolution inference: sliding windows, multi-scale and flip test-time augmentation.

Every path returns logits at the input's own resolution. Overlapping windows, scales and flips
are combined by averaging logits, so a setting that adds nothing (one window covering the whole
image, a single scale of 1, no flip) gives exactly the plain forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _positions(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis covering ``[0, size)``; the last window touches the edge."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


def sliding_window_logits(
    model: nn.Module,
    images: torch.Tensor,
    window: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
) -> torch.Tensor:
    """Logits of ``images`` (N x 3 x H x W) from overlapping ``window``-sized crops.

    Only one window is in the model at a time, so memory is bounded by the window and the
    N x C x H x W accumulator, whatever the image size. Where windows overlap their logits are
    averaged. An image no larger than the window is one window: the plain forward pass.
    """
    n, _, height, width = images.shape
    wh, ww = window
    sh, sw = stride
    if height <= wh and width <= ww:
        return model(images).float()
    total = torch.zeros(n, num_classes, height, width, device=images.device)
    count = torch.zeros(1, 1, height, width, device=images.device)
    for top in _positions(height, wh, sh):
        for left in _positions(width, ww, sw):
            crop = images[..., top : top + wh, left : left + ww]
            total[..., top : top + wh, left : left + ww] += model(crop).float()
            count[..., top : top + wh, left : left + ww] += 1
    return total / count


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    num_classes: int,
    window: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    hflip: bool = False,
) -> torch.Tensor:
    """Logits at full resolution, averaged over ``scales`` and (with ``hflip``) mirror images.

    Each scaled (and flipped) copy is inferred whole or, with ``window``, by sliding windows
    (``stride`` defaults to two thirds of the window), and its logits are resized back to the
    input's size before averaging.
    """
    height, width = images.shape[-2:]
    if window is not None and stride is None:
        stride = [max(1, 2 * w // 3) for w in window]
    total = None
    views = 0
    for scale in scales:
        scaled = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True) if hflip else (False,):
            x = scaled.flip(-1) if flip else scaled
            if window is None:
                logits = model(x).float()
            else:
                logits = sliding_window_logits(model, x, window, stride, num_classes)
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
            views += 1
    return total / views
