"""The augmentation presets, normalisation and padded batching."""

from __future__ import annotations

import numpy as np
import torch

from fcn.data.folder import SegmentationFolder, find_pairs
from fcn.data.loader import make_loader, pad_collate
from fcn.data.transforms import normalize, train_transforms
from tests.layouts import write_pair


def test_train_crop_pads_masks_with_ignore_index():
    transform = train_transforms(crop_size=32, scale_range=(1, 1), hflip=0, color_jitter=0, ignore_index=255)
    out = transform(image=np.zeros((10, 12, 3), np.uint8), mask=np.ones((10, 12), np.uint8))
    assert out["image"].shape == (32, 32, 3)
    assert set(np.unique(out["mask"])) == {1, 255}
    assert (out["mask"] == 1).sum() == 10 * 12  # nothing lost, nothing invented


def test_random_scale_resizes_masks_with_nearest_neighbour():
    transform = train_transforms(crop_size=16, scale_range=(1.7, 1.7), hflip=0, color_jitter=0, ignore_index=255)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 3
    out = transform(image=np.zeros((16, 16, 3), np.uint8), mask=mask)
    assert set(np.unique(out["mask"])) <= {0, 3}  # no blended labels


def test_pad_collate_pads_images_with_zero_and_masks_with_ignore():
    a = (torch.ones(3, 4, 5, dtype=torch.uint8), torch.zeros(4, 5, dtype=torch.long))
    b = (torch.ones(3, 6, 3, dtype=torch.uint8), torch.ones(6, 3, dtype=torch.long))
    images, masks = pad_collate([a, b], ignore_index=255)
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert images[0, :, 4:].sum() == 0 and (masks[0, 4:] == 255).all() and (masks[1, :, 3:] == 255).all()


def test_loader_with_workers_yields_padded_batches(tmp_path):
    write_pair(tmp_path, "a", size=(20, 16))
    write_pair(tmp_path, "b", size=(12, 18))
    loader = make_loader(
        SegmentationFolder(find_pairs(tmp_path, "train", split_file=None)),
        batch_size=2,
        num_workers=1,
        ignore_index=255,
    )
    images, masks = next(iter(loader))
    assert images.shape == (2, 3, 18, 20) and masks.shape == (2, 18, 20)


def test_normalize_maps_uint8_to_standardised_float():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, mean=[0.5] * 3, std=[0.25] * 3)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))
