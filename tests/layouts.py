"""Writers of tiny datasets in each supported layout, for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

VOC_PALETTE = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


def image_array(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def mask_array(height: int, width: int, values: list[int], seed: int = 0) -> np.ndarray:
    """A mask in vertical stripes of ``values`` (every value present when the mask is wide enough)."""
    columns = np.arange(width) * len(values) // width
    return np.tile(np.array(values, dtype=np.uint8)[columns], (height, 1))


def save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def write_folder(root: Path, names=("a", "b", "c"), size=(24, 32), values=(0, 1), split_lists=None) -> Path:
    """The generic layout: images/<name>.jpg, masks/<name>.png, optional splits/<split>.txt."""
    h, w = size
    for i, name in enumerate(names):
        save(image_array(h, w, i), root / "images" / f"{name}.jpg")
        save(mask_array(h, w, list(values), i), root / "masks" / f"{name}.png")
    for split, listed in (split_lists or {}).items():
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{n}\n" for n in listed))
    return root


def write_camvid(root: Path, splits=("train", "val"), per_split=3, size=(36, 48)) -> Path:
    """SegNet layout: <split>/*.png images, <split>annot/*.png masks, 11 classes + void 11."""
    h, w = size
    for split in splits:
        for i in range(per_split):
            name = f"0001TP_{split}_{i:03d}"
            save(image_array(h, w, i), root / split / f"{name}.png")
            save(mask_array(h, w, [0, 3, 8, 11], i), root / f"{split}annot" / f"{name}.png")
    return root


def write_voc(root: Path, train=("2007_000032", "2007_000039"), val=("2007_000063",), size=(30, 40)) -> Path:
    """VOC 2012: JPEGImages/*.jpg, SegmentationClass/*.png palette masks with 255 borders, ImageSets lists."""
    h, w = size
    for i, name in enumerate((*train, *val)):
        save(image_array(h, w, i), root / "JPEGImages" / f"{name}.jpg")
        mask = mask_array(h, w, [0, 1, 2], i)
        mask[:, w // 3] = 255  # object border
        palette_mask = Image.fromarray(mask, mode="L").convert("P")
        flat = [c for colour in VOC_PALETTE for c in colour] + [224, 224, 192] * 253
        palette_mask.putpalette(flat)
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        palette_mask.save(root / "SegmentationClass" / f"{name}.png")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{n}\n" for n in train))
    (sets / "val.txt").write_text("".join(f"{n}\n" for n in val))
    return root


def write_cityscapes(root: Path, cities=("aachen", "bochum"), size=(16, 32), mask_kind="labelTrainIds") -> Path:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_<kind>.png."""
    h, w = size
    values = [0, 13, 18, 255] if mask_kind == "labelTrainIds" else [7, 26, 33, 0]
    for split in ("train", "val"):
        for j, city in enumerate(cities):
            stem = f"{city}_00000{j}_000019"
            save(image_array(h, w, j), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            save(mask_array(h, w, values, j), root / "gtFine" / split / city / f"{stem}_gtFine_{mask_kind}.png")
            # the other files gtFine holds, which must not be taken for masks
            save(mask_array(h, w, [1], j), root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
    return root


def write_ade20k(root: Path, size=(20, 30)) -> Path:
    """ADEChallengeData2016: images/{training,validation}/*.jpg, annotations/.../*.png with 0 = other."""
    h, w = size
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for i in range(2):
            name = f"{prefix}_{i + 1:08d}"
            save(image_array(h, w, i), root / "images" / split / f"{name}.jpg")
            save(mask_array(h, w, [0, 1, 150], i), root / "annotations" / split / f"{name}.png")
    return root


def write_pair(root: Path, stem: str, size=(20, 16), ext=".jpg", value=1) -> None:
    """One flat grey image and a constant mask (``value``) in ``root/images`` and ``root/masks``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(root / "images" / f"{stem}{ext}")
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(root / "masks" / f"{stem}.png")
