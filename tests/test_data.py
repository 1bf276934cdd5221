"""Reading a folder dataset, the augmentation presets and padded batching."""

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.data.folder import SegmentationFolder, find_pairs
from fcn.data.loader import make_loader, pad_collate
from fcn.data.transforms import normalize, train_transforms
from fcn.errors import UserError


def _write_pair(root, stem, size=(20, 16), ext=".jpg", value=1):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(root / "images" / f"{stem}{ext}")
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(root / "masks" / f"{stem}.png")


def test_images_match_masks_by_stem_for_any_image_extension(tmp_path):
    _write_pair(tmp_path, "a", ext=".jpg")
    _write_pair(tmp_path, "b", ext=".png")
    _write_pair(tmp_path, "c", ext=".bmp")
    pairs = find_pairs(tmp_path, "train", split_file=None)
    assert [(i.name, m.name) for i, m in pairs] == [("a.jpg", "a.png"), ("b.png", "b.png"), ("c.bmp", "c.png")]


def test_split_list_selects_and_orders_images(tmp_path):
    for stem in "abc":
        _write_pair(tmp_path, stem)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_text("c\na\n")
    pairs = find_pairs(tmp_path, "val")
    assert [i.stem for i, _ in pairs] == ["c", "a"]


def test_split_placeholder_in_folder_names(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "x.png")
    Image.new("L", (8, 8)).save(tmp_path / "trainannot" / "x.png")
    pairs = find_pairs(tmp_path, "train", image_dir="{split}", mask_dir="{split}annot", split_file=None)
    assert pairs[0][1] == tmp_path / "trainannot" / "x.png"


def test_missing_root_names_the_absolute_path_and_the_key(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'}.*data.root"):
        find_pairs(tmp_path / "nowhere", "train")


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(UserError, match="split 'train' is empty"):
        find_pairs(tmp_path, "train", split_file=None)


def test_images_without_masks_are_listed(tmp_path):
    _write_pair(tmp_path, "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "orphan.png")
    with pytest.raises(UserError, match="1 images .* no mask.*orphan"):
        find_pairs(tmp_path, "train", split_file=None)


def test_mask_size_mismatch_names_both_files(tmp_path):
    _write_pair(tmp_path, "a", size=(20, 16))
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(tmp_path / "masks" / "a.png")  # transposed
    dataset = SegmentationFolder(find_pairs(tmp_path, "train", split_file=None))
    with pytest.raises(UserError, match=r"a\.png is 16x20 but image .*a\.jpg is 20x16"):
        dataset[0]


def test_items_are_uint8_images_and_int64_masks(tmp_path):
    _write_pair(tmp_path, "a", size=(20, 16), value=2)
    image, mask = SegmentationFolder(find_pairs(tmp_path, "train", split_file=None))[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 20)
    assert mask.dtype == torch.int64 and mask.shape == (16, 20) and mask.unique().tolist() == [2]


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
    _write_pair(tmp_path, "a", size=(20, 16))
    _write_pair(tmp_path, "b", size=(12, 18))
    loader = make_loader(SegmentationFolder(find_pairs(tmp_path, "train", split_file=None)),
                         batch_size=2, num_workers=1, ignore_index=255)  # fmt: skip
    images, masks = next(iter(loader))
    assert images.shape == (2, 3, 18, 20) and masks.shape == (2, 18, 20)


def test_normalize_maps_uint8_to_standardised_float():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, mean=[0.5] * 3, std=[0.25] * 3)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))


def test_a_glob_selects_the_split_without_a_list(tmp_path):
    for stem in ("seq1_a", "seq1_b", "seq2_a"):
        _write_pair(tmp_path, stem)
    pairs = find_pairs(tmp_path, "train", split_file=None, image_glob="seq1_*")
    assert [i.stem for i, _ in pairs] == ["seq1_a", "seq1_b"]
    with pytest.raises(UserError, match="no files matching 'seq9_\\*'"):
        find_pairs(tmp_path, "train", split_file=None, image_glob="seq9_*")
