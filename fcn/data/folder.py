"""A dataset of image files and index-mask files matched by file stem.

This is the layout every dataset here is read through, the built-in ``shapes`` included:

    root/
      images/  000001.jpg ...      (any common image extension)
      masks/   000001.png ...      (single-channel PNG, pixel value = class index)
      splits/  train.txt val.txt   (one stem per line; optional)

Folder names may contain ``{split}``, so the SegNet layout of CamVid (``train/`` +
``trainannot/``) is ``image_dir="{split}", mask_dir="{split}annot"``. Without a split file every
image in the image folder that has a mask is used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fcn.data.transforms import reseed
from fcn.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _files_by_stem(folder: Path, extensions: tuple[str, ...], pattern: str | None = None) -> dict[str, Path]:
    files = folder.glob(pattern) if pattern else folder.iterdir()
    return {p.stem: p for p in sorted(files) if p.suffix.lower() in extensions and p.is_file()}


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def find_pairs(
    root: str | Path,
    split: str,
    image_dir: str = "images",
    mask_dir: str = "masks",
    split_file: str | None = "splits/{split}.txt",
    mask_suffix: str = ".png",
    image_glob: str | None = None,
) -> list[tuple[Path, Path]]:
    """List ``(image, mask)`` paths of one split, raising :class:`UserError` on a bad layout.

    The split is the stems listed in ``split_file`` or, without one, the images of the image
    folder, narrowed to those matching ``image_glob`` (e.g. ``"seq01_*"``, ``"**/*.jpg"``) if given.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root not found: {root.resolve()} (set data.root=PATH)")
    images_folder = root / image_dir.format(split=split)
    masks_folder = root / mask_dir.format(split=split)
    for folder, key in ((images_folder, "data.image_dir"), (masks_folder, "data.mask_dir")):
        if not folder.is_dir():
            raise UserError(f"folder for split {split!r} not found: {folder.resolve()} (check {key} and data.root)")
    images = _files_by_stem(images_folder, IMAGE_EXTENSIONS, image_glob)
    masks = _files_by_stem(masks_folder, (mask_suffix,))
    if split_file:
        list_path = root / split_file.format(split=split)
        if not list_path.is_file():
            raise UserError(f"split list not found: {list_path.resolve()} (check data.split_file)")
        stems = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        missing = [s for s in stems if s not in images]
        if missing:
            raise UserError(f"{list_path}: {len(missing)} listed images not in {images_folder}: {_first(missing)}")
    else:
        stems = list(images)
    if not stems:
        pattern = f" matching {image_glob!r}" if image_glob else ""
        raise UserError(
            f"split {split!r} is empty: no images{pattern} with extensions {IMAGE_EXTENSIONS} in "
            f"{images_folder.resolve()}"
        )
    unmatched = [s for s in stems if s not in masks]
    if unmatched:
        raise UserError(
            f"{len(unmatched)} images in {images_folder} have no mask '<stem>{mask_suffix}' "
            f"in {masks_folder}: {_first(unmatched)}"
        )
    return [(images[s], masks[s]) for s in stems]


def read_image(path: Path) -> np.ndarray:
    """Read an image file as an ``H x W x 3`` uint8 RGB array."""
    try:
        with Image.open(path) as image:
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


def read_mask(path: Path) -> np.ndarray:
    """Read a single-channel index mask as an ``H x W`` uint8 array of class indices."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("L", "P"):
                raise UserError(
                    f"mask {path} has mode {mask.mode}; masks must be single-channel index PNGs "
                    "(pixel value = class index)"
                )
            return np.array(mask)
    except OSError as exc:
        raise UserError(f"cannot read mask {path}: {exc}") from exc


class SegmentationFolder(Dataset):
    """Image/mask pairs from :func:`find_pairs`, passed through an albumentations transform.

    Items are ``(image, mask)``: a ``3 x H x W`` uint8 tensor (normalised later, on the device,
    by :func:`fcn.data.transforms.normalize`) and an ``H x W`` int64 tensor of class indices.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        transform: Callable | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.pairs = pairs
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``key`` is an index, or ``(index, seed)`` from :class:`fcn.data.sampler.ResumableSampler`
        to draw this sample's augmentation from its own seed."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise UserError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}; masks must have the size of their image"
            )
        if self.num_classes is not None:
            # Checked here, not left to the loss: on a GPU an out-of-range label is a device-side assert.
            outside = (mask >= self.num_classes) & (mask != self.ignore_index)
            if outside.any():
                bad = np.unique(mask[outside])
                raise UserError(
                    f"mask {mask_path} has values {bad.tolist()} outside [0, {self.num_classes}) that are not "
                    f"the ignore index {self.ignore_index}; set data.num_classes / data.ignore_index to match the masks"
                )
        if self.transform is not None:
            if seed is not None:
                reseed(self.transform, seed)
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image, torch.from_numpy(np.ascontiguousarray(mask)).long()
