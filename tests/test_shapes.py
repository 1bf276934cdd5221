"""The built-in shapes dataset: deterministic, complete, and solvable by shape only."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from fcn.data.shapes import CLASS_NAMES, META_FILE, ensure_shapes, render_sample
from fcn.errors import UserError


def test_generation_is_deterministic_per_seed_and_index():
    a_img, a_mask = render_sample(seed=7, index=3, size=64)
    b_img, b_mask = render_sample(seed=7, index=3, size=64)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    c_img, _ = render_sample(seed=8, index=3, size=64)
    assert not np.array_equal(a_img, c_img)


def test_same_seed_writes_identical_files(tmp_path):
    a = ensure_shapes(tmp_path / "a", num_train=4, num_val=2, size=40, seed=1)
    b = ensure_shapes(tmp_path / "b", num_train=4, num_val=2, size=40, seed=1)
    for sub in ("images", "masks"):
        for f in sorted((a / sub).iterdir()):
            assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(b / sub / f.name)))
    assert (a / "splits" / "train.txt").read_text() == (b / "splits" / "train.txt").read_text()


def test_layout_is_the_generic_folder_layout(tmp_path):
    root = ensure_shapes(tmp_path / "s", num_train=5, num_val=3, size=32, seed=0)
    train = (root / "splits" / "train.txt").read_text().split()
    val = (root / "splits" / "val.txt").read_text().split()
    assert len(train) == 5 and len(val) == 3 and not set(train) & set(val)
    for stem in train + val:
        mask = Image.open(root / "masks" / f"{stem}.png")
        assert mask.mode == "L"
        assert Image.open(root / "images" / f"{stem}.png").size == mask.size


def test_every_class_appears_with_varied_colours():
    masks, colours = [], {c: [] for c in range(1, len(CLASS_NAMES))}
    for i in range(60):
        image, mask = render_sample(0, i, 64)
        masks.append(mask)
        for c in colours:
            if (mask == c).sum() > 20:
                colours[c].append(image[mask == c].mean(0))
    assert set(np.unique(np.stack(masks))) == set(range(len(CLASS_NAMES)))
    for c, means in colours.items():
        # colour carries no class information: each class spans most of the colour range
        assert np.ptp(np.stack(means), axis=0).min() > 100, CLASS_NAMES[c]


def test_existing_copy_is_reused_and_other_settings_regenerate(tmp_path):
    root = ensure_shapes(tmp_path / "s", num_train=2, num_val=1, size=32, seed=0)
    stamp = os.stat(root / META_FILE).st_mtime_ns
    ensure_shapes(root, num_train=2, num_val=1, size=32, seed=0)
    assert os.stat(root / META_FILE).st_mtime_ns == stamp
    ensure_shapes(root, num_train=3, num_val=1, size=32, seed=0)
    assert json.loads((root / META_FILE).read_text())["num_train"] == 3
    assert len((root / "splits" / "train.txt").read_text().split()) == 3


def test_a_folder_it_did_not_make_is_never_overwritten(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "photo.jpg").write_bytes(b"user data")
    with pytest.raises(UserError, match="not a generated shapes dataset"):
        ensure_shapes(precious, num_train=2, num_val=1, size=32, seed=0)
    assert (precious / "photo.jpg").read_bytes() == b"user data"
