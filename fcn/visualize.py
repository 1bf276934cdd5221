"""Pictures of predictions: masks coloured with the dataset's palette, and comparison grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
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


def overlay(
    image: torch.Tensor, mask: torch.Tensor, palette: Sequence[Sequence[int]], alpha: float = 0.5
) -> torch.Tensor:
    """The ``3 x H x W`` uint8 image with each class of the ``H x W`` ``mask`` painted over it in its
    palette colour (``alpha`` of the colour); pixels outside ``0..len(palette)-1`` are left as they are.

    The blend of :func:`torchvision.utils.draw_segmentation_masks`, through a colour table: one
    ``H x W`` lookup whatever the class count (draw_segmentation_masks stacks one boolean mask per
    class, 300 x H x W for 300 classes).
    """
    image, mask = image.cpu(), mask.cpu().long()
    lut = torch.tensor([list(c) for c in palette], dtype=torch.float32)
    valid = (mask >= 0) & (mask < len(palette))
    colours = lut[mask.clamp(0, len(palette) - 1)].permute(2, 0, 1)
    blended = image.float() * (1 - alpha) + colours * alpha
    return torch.where(valid, blended.round().to(torch.uint8), image)


def index_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """The ``H x W`` class indices as a lossless PNG image: mode "P" (pixel value = class index,
    shown in the palette's colours) for up to 256 classes; beyond that 16-bit greyscale ("I;16",
    pixel value = class index, up to 65536 classes), since a PNG palette holds at most 256 colours.

    Raises ValueError for an index outside what the file can hold (below 0, or above 255 / 65535).
    """
    wide = len(palette) > 256
    high = 65535 if wide else 255
    if mask.size and (mask.min() < 0 or mask.max() > high):
        raise ValueError(f"class indices {mask.min()}..{mask.max()} do not fit a {16 if wide else 8}-bit PNG")
    if wide:
        return Image.fromarray(mask.astype(np.uint16))  # PNG stores it as 16-bit greyscale
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [v for colour in palette for v in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def confusion_image(confusion: torch.Tensor, class_names: Sequence[str], cell: int = 36) -> Image.Image:
    """The row-normalised confusion matrix as a picture: rows are ground truth, columns are
    predictions, each cell shaded by the fraction of its row and labelled in percent."""
    rows = confusion.double()
    norm = rows / rows.sum(1, keepdim=True).clamp(min=1)
    n = len(class_names)
    font = ImageFont.load_default()
    label = max(font.getlength(name) for name in class_names) + 10
    margin = int(label) + 20
    footer = "rows: ground truth, columns: predicted (% of row)"
    size = (int(max(margin + n * cell, 10 + font.getlength(footer))) + 10, margin + n * cell + 22)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        for j in range(n):
            v = float(norm[i, j])
            shade = int(255 * (1 - v))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((x + 3, y + cell // 3), f"{100 * v:.0f}", fill="white" if v > 0.5 else "black", font=font)
    for k, name in enumerate(class_names):
        draw.text((5, margin + k * cell + cell // 3), name, fill="black", font=font)  # rows: ground truth
        column = Image.new("RGBA", (int(label), 14), (255, 255, 255, 0))
        ImageDraw.Draw(column).text((0, 0), name, fill="black", font=font)
        rotated = column.rotate(90, expand=True)
        canvas.paste(rotated, (margin + k * cell + cell // 3, 5), rotated)  # columns: prediction
    draw.text((5, size[1] - 14), footer, fill="gray", font=font)
    return canvas
