"""Pictures of predictions: masks coloured with the dataset's palette, and comparison grids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import make_grid


def colorize(masks: torch.Tensor, palette: Sequence[Sequence[int]], ignore_index: int) -> torch.Tensor:
    """``N x H x W`` class indices to ``N x 3 x H x W`` uint8 colours; ignored pixels are white."""
    lut = torch.tensor(list(palette) + [[255, 255, 255]], dtype=torch.uint8, device=masks.device)
    index = masks.clone()
    index[(masks == ignore_index) | (masks < 0) | (masks >= len(palette))] = len(palette)
    return lut[index].permute(0, 3, 1, 2)


def comparison_grid(
    images: torch.Tensor,
    targets: torch.Tensor,
    preds: torch.Tensor,
    palette: Sequence[Sequence[int]],
    ignore_index: int,
) -> torch.Tensor:
    """A ``3 x H x W`` uint8 grid with one row per sample: input, ground truth, prediction."""
    gt = colorize(targets, palette, ignore_index)
    pr = colorize(preds, palette, ignore_index)
    tiles = torch.stack([images.cpu(), gt.cpu(), pr.cpu()], dim=1).flatten(0, 1)
    return make_grid(tiles, nrow=3, padding=2, pad_value=128)


def default_palette(num_classes: int) -> list[list[int]]:
    """Distinct colours for datasets that bring no palette (the PASCAL VOC bit-interleaving scheme)."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette
