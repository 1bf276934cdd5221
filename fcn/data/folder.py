"""A dataset of image files and mask files matched by name.

This is the layout every dataset here is read through, the built-in ``shapes`` included:

    root/
      images/  000001.jpg ...      (any common image extension)
      masks/   000001.png ...      (index PNG, pixel value = class index; or RGB colour masks)
      splits/  train.txt val.txt   (one name per line; optional)

An image and its mask match when their paths relative to their folders are the same once the
suffix is taken off: ``images/a.jpg`` and ``masks/a.png`` by default; with
``image_suffix="_leftImg8bit.png"``, ``mask_suffix="_gtFine_labelTrainIds.png"`` and
``recursive=True``, Cityscapes' ``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``
and ``gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png`` (key
``aachen/aachen_000000_000019``). Folder names may contain ``{split}``, so the SegNet layout of
CamVid (``train/`` + ``trainannot/``) is ``image_dir="{split}", mask_dir="{split}annot"``. Without
a split file every image in the image folder is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fcn.data.doctor.diagnose import AlternativeMasks, find_alternative_masks, folder_hint
from fcn.data.labels import MaskDecoder, image_to_rgb
from fcn.data.pixel_limit import too_many_pixels_message
from fcn.data.splits import (
    DEFAULT_SPLIT_FILE,
    DEFAULT_SPLITS,
    default_split,
    default_split_applies,
    is_tool_list,
    read_split_list,
    refresh_default_splits,
    resolve_names,
    shown,
    stale_list_message,
    write_default_splits,
)
from fcn.data.transforms import reseed
from fcn.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, following symbolic links to folders as ``ls -R`` and
    ``os.walk(followlinks=True)`` do (datasets are often assembled from linked camera folders).

    Raises :class:`UserError` naming the link when a linked folder contains itself (a loop).
    """
    files: list[Path] = []
    # a folder whose real path is already on the way down from ``folder`` is a loop
    stack = [(folder, (os.path.realpath(folder),))]
    while stack:
        current, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"cannot list dataset folder {current}: {exc.strerror or exc}") from exc
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir():  # follows links
                real = os.path.realpath(path)
                if real in ancestors:
                    raise UserError(
                        f"symbolic link loop in the dataset: {path} -> {real} contains itself; remove or "
                        "retarget the link (linked folders are followed with data.recursive=true)"
                    )
                stack.append((path, (*ancestors, real)))
            elif entry.is_file():
                files.append(path)
    return files


def _files_by_key(folder: Path, suffixes: tuple[str, ...], pattern: str | None, recursive: bool) -> dict[str, Path]:
    """Files of ``folder`` ending in one of ``suffixes``, keyed by relative path minus the suffix.

    Recursive listings (``recursive`` or a ``**`` pattern) follow linked folders (:func:`_walk_files`);
    :meth:`Path.rglob` would skip them before Python 3.13.
    """
    if pattern and "**" in pattern:
        files = [p for p in _walk_files(folder) if _glob_match(p.relative_to(folder).as_posix(), pattern)]
    elif pattern:
        files = folder.glob(pattern)
    else:
        files = _walk_files(folder) if recursive else folder.iterdir()
    found: dict[str, Path] = {}
    for path in sorted(files):
        relative = path.relative_to(folder).as_posix()
        suffix = next((s for s in suffixes if relative.lower().endswith(s.lower())), None)
        if suffix is not None and path.is_file():
            found.setdefault(relative[: len(relative) - len(suffix)], path)
    return found


def _glob_match(relative: str, pattern: str) -> bool:
    """Whether a relative posix path matches a glob where ``**/`` is zero or more folders."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:[^/]*/)*", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:  # a character class, as glob has them
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            regex, i = regex + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
        else:
            piece = pattern[i]
            regex += {"*": "[^/]*", "?": "[^/]"}.get(piece) or re.escape(piece)
            i += 1
    return re.fullmatch(regex, relative) is not None


def first_items(items: list[str], n: int = 5) -> str:
    """``a, b, c, ... (N in all)``: the start of a long list, for error messages."""
    listed = ", ".join(shown(item) for item in items[:n])  # repr for names with unprintable characters
    return listed + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _contents(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return first_items(names, 10) if names else "nothing"


@dataclass
class SplitFiles:
    """The files of one split: matched pairs, and the names that did not match."""

    pairs: list[tuple[Path, Path]]
    images_folder: Path
    masks_folder: Path
    images_without_mask: list[str] = field(default_factory=list)
    masks_without_image: list[str] = field(default_factory=list)
    listed_without_image: list[str] = field(default_factory=list)
    split_list: Path | None = None
    list_notes: list[str] = field(default_factory=list)  # what reading the split list cleaned up
    default_lists: dict[str, Path] = field(default_factory=dict)  # default split lists written now
    alternative: AlternativeMasks | None = None  # masks of the unmatched images under another name
    refreshed: str | None = None  # fcn's own default lists rewritten now: which pairs appeared or vanished
    images: list[Path] = field(default_factory=list)  # every image of the split, with a mask or not


def list_split(
    root: str | Path,
    split: str,
    image_dir: str = "images",
    mask_dir: str = "masks",
    split_file: str | None = "splits/{split}.txt",
    mask_suffix: str = ".png",
    image_glob: str | None = None,
    image_suffix: str | None = None,
    recursive: bool = False,
) -> SplitFiles:
    """Match the images and masks of one split, keeping what did not match for the caller.

    Raises :class:`UserError` when the layout itself is wrong (root, folders or split list
    missing, no images at all), naming the absolute paths and the patterns tried.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root not found: {root.resolve()} (set data.root=PATH)")
    images_folder = root / image_dir.format(split=split)
    masks_folder = root / mask_dir.format(split=split)
    for folder, key in ((images_folder, "data.image_dir"), (masks_folder, "data.mask_dir")):
        if not folder.is_dir():
            raise UserError(
                f"folder for split {split!r} not found: {folder.resolve()} (check {key} and data.root; "
                f"{root.resolve()} contains {_contents(root)}{folder_hint(folder) if key == 'data.mask_dir' else ''})"
            )
    image_suffixes = (image_suffix,) if image_suffix else IMAGE_EXTENSIONS
    images = _files_by_key(images_folder, image_suffixes, image_glob, recursive)
    masks = _files_by_key(masks_folder, (mask_suffix,), None, recursive or bool(image_glob and "**" in image_glob))
    listed_without_image: list[str] = []
    list_notes: list[str] = []
    default_lists: dict[str, Path] = {}
    refreshed = None
    list_path = None
    if split_file:
        list_path = root / split_file.format(split=split)
        in_memory = False
        ours = split_file == DEFAULT_SPLIT_FILE and "{split}" not in image_dir and split in DEFAULT_SPLITS
        if ours and images and images.keys() <= masks.keys() and is_tool_list(list_path):
            refreshed = refresh_default_splits(root, split_file, list(images))  # follows the folder
        if not list_path.is_file() and default_split_applies(split, split_file, image_dir, root) and images:
            if images.keys() <= masks.keys():
                default_lists = write_default_splits(root, split_file, list(images))
            else:
                # nothing is written into the user's data before every image has its mask: the same
                # seeded split is made in memory, and the missing masks are reported by the caller
                in_memory = True
        if in_memory:
            keys = default_split(list(images))[split]
        elif not list_path.is_file():
            raise UserError(
                f"split list not found: {list_path.resolve()} (check data.split_file; data.split_file=null uses "
                "every image of the folder)"
            )
        else:
            names, list_notes = read_split_list(list_path)
            keys, rewritten = resolve_names(names, images, image_dir.format(split=split))
            if rewritten:
                list_notes.append(f"names {rewritten} images with their extension or folder (matched without them)")
            listed_without_image = [k for k in keys if k not in images]
            keys = [k for k in keys if k in images]
    else:
        keys = list(images)
    if split_file and not keys and not listed_without_image:
        raise UserError(f"split list {list_path.resolve()} names no images (check data.split_file)")
    if not keys and not listed_without_image:
        pattern = image_glob or ("**/*" if recursive else "*")
        raise UserError(
            f"split {split!r} is empty: no files matching {pattern!r} ending in {', '.join(image_suffixes)} in "
            f"{images_folder.resolve()} (it contains {_contents(images_folder)}); check data.root, data.image_dir, "
            "data.image_suffix and data.image_glob"
        )
    key_set = set(keys)
    without_mask = [k for k in keys if k not in masks]
    return SplitFiles(
        pairs=[(images[k], masks[k]) for k in keys if k in masks],
        images_folder=images_folder,
        masks_folder=masks_folder,
        images_without_mask=without_mask,
        # with a split list or a glob the split is a subset: the other masks belong to other images
        masks_without_image=[] if split_file or image_glob else [k for k in masks if k not in key_set],
        listed_without_image=listed_without_image,
        split_list=list_path,
        list_notes=list_notes,
        default_lists=default_lists,
        refreshed=refreshed,
        alternative=find_alternative_masks(masks_folder, {k: images[k] for k in without_mask}, mask_suffix),
        images=[images[k] for k in keys if k in images],
    )


def find_pairs(root: str | Path, split: str, **layout) -> list[tuple[Path, Path]]:
    """List ``(image, mask)`` paths of one split (layout keywords as :func:`list_split`),
    raising :class:`UserError` when an image has no mask or a listed image is missing.

    The split is the names listed in ``split_file`` or, without one, the images of the image
    folder, narrowed to those matching ``image_glob`` (e.g. ``"seq01_*"``, ``"**/*.jpg"``) if given.
    """
    files = list_split(root, split, **layout)
    mask_suffix = layout.get("mask_suffix", ".png")
    if files.listed_without_image:
        ours = layout.get("split_file", DEFAULT_SPLIT_FILE) == DEFAULT_SPLIT_FILE
        raise UserError(stale_list_message(files.split_list, files.listed_without_image, files.images_folder, ours))
    if files.images_without_mask:
        unmatched = files.images_without_mask
        if files.alternative is not None:
            raise UserError(f"{len(unmatched)} images in {files.images_folder}: {files.alternative.message()}")
        raise UserError(
            f"{len(unmatched)} images in {files.images_folder} have no mask '<name>{mask_suffix}' "
            f"in {files.masks_folder}: {first_items(unmatched)} (check data.mask_dir and data.mask_suffix)"
        )
    return files.pairs


def read_image(path: Path) -> np.ndarray:
    """Read an image file as an ``H x W x 3`` uint8 RGB array (conversions: :mod:`fcn.data.labels`)."""
    try:
        with Image.open(path) as image:
            return image_to_rgb(image, path)
    except Image.DecompressionBombError as exc:
        raise UserError(too_many_pixels_message(path, exc)) from exc
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


def read_mask(path: Path, decoder: MaskDecoder) -> np.ndarray:
    """Read a mask file as an ``H x W`` array of class indices, decoded by ``decoder``."""
    try:
        with Image.open(path) as mask:
            return decoder.decode(mask, path)
    except Image.DecompressionBombError as exc:
        raise UserError(too_many_pixels_message(path, exc)) from exc
    except OSError as exc:
        raise UserError(f"cannot read mask {path}: {exc}") from exc


class SegmentationFolder(Dataset):
    """Image/mask pairs from :func:`find_pairs`, passed through an albumentations transform.

    ``decoder`` turns mask pixels into class indices (label map, palette colours); by default
    masks hold class indices already.

    Items are ``(image, mask)``: a ``3 x H x W`` uint8 tensor (normalised later, on the device,
    by :func:`fcn.data.transforms.normalize`) and an ``H x W`` int64 tensor of class indices.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        transform: Callable | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
        decoder: MaskDecoder | None = None,
    ) -> None:
        self.pairs = pairs
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.decoder = decoder or MaskDecoder(num_classes or 256, ignore_index)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``key`` is an index, or ``(index, seed)`` from :class:`fcn.data.sampler.ResumableSampler`
        to draw this sample's augmentation from its own seed."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path), read_mask(mask_path, self.decoder)
        if image.shape[:2] != mask.shape:
            raise UserError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}; masks must have the size of their image"
            )
        if self.num_classes is not None:
            # Checked here, not left to the loss: on a GPU an out-of-range label is a device-side assert.
            outside = mask >= self.num_classes
            if mask.dtype.kind == "i":  # only signed masks (a label_map target) can go below 0
                outside |= mask < 0
            outside &= mask != self.ignore_index
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
