"""A newcomer's binary dataset as downloaded gets every problem named in one run of the doctor.

The folder: ``images/*.jpg`` and ``masks/*.jpg`` with the same stems, no split lists, masks saved
as JPEG (0 and 255 with compression noise), two masks of another size than their image.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fcn.cli.check_data import run_check
from fcn.data.folder import find_pairs, list_split
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import image_array, write_folder

LAYOUT = {"split_file": "splits/{split}.txt"}


def write_newcomer_folder(root, n=10, resized=(0, 1)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((40, 48), np.uint8)
        mask[10:30, 12:36] = 255
        if i in resized:
            mask = mask[:36, :44]
        Image.fromarray(image_array(40, 48, i)).save(root / "images" / f"img{i:02d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"img{i:02d}.jpg", quality=75)
    return root


def _doctor(root, tmp_path):
    cfg = compose_config(
        "check_data",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=2",
            "data.class_names=[bg,fg]",
            f"report={tmp_path / 'r.json'}",
            "cache=false",
        ],
    )
    return run_check(cfg, tmp_path)


def test_a_folder_without_split_lists_gets_a_seeded_default_split_written_next_to_it(tmp_path):
    root = write_folder(tmp_path / "d", names=[f"n{i}" for i in range(10)])
    train = list_split(root, "train", **LAYOUT)
    val = list_split(root, "val", **LAYOUT)
    train_names = (root / "splits" / "train.txt").read_text().split()
    val_names = (root / "splits" / "val.txt").read_text().split()
    assert len(train_names) == 8 and len(val_names) == 2 and not set(train_names) & set(val_names)
    assert sorted(train_names + val_names) == [f"n{i}" for i in range(10)]
    assert set(train.default_lists) == {"train", "val"} and not val.default_lists  # written once, by the first
    again = write_folder(tmp_path / "e", names=[f"n{i}" for i in range(10)])
    list_split(again, "train", **LAYOUT)
    assert (again / "splits" / "val.txt").read_text().split() == val_names  # seeded: the same split every time


def test_the_default_split_never_overwrites_an_existing_list(tmp_path):
    root = write_folder(tmp_path / "d", split_lists={"train": ["a"]})
    with pytest.raises(UserError, match="split list not found"):
        list_split(root, "val", **LAYOUT)  # one list of the pair is the user's: not completed behind their back
    assert (root / "splits" / "train.txt").read_text() == "a\n" and not (root / "splits" / "val.txt").exists()
    from fcn.data.splits import write_default_splits

    keep = tmp_path / "keep.txt"
    keep.write_text("mine\n")
    assert write_default_splits(tmp_path, "keep.txt", ["x", "y"]) == {}  # the file exists: nothing written
    assert keep.read_text() == "mine\n"


def test_a_published_datasets_missing_lists_are_reported_not_made_up(tmp_path):
    root = write_folder(tmp_path / "d")
    with pytest.raises(UserError, match="split list not found"):
        list_split(root, "train", split_file="ImageSets/Segmentation/{split}.txt")
    assert not (root / "ImageSets").exists()


def test_masks_under_another_extension_are_named_with_the_suffix_that_reads_them(tmp_path):
    root = write_newcomer_folder(tmp_path / "d")
    with pytest.raises(UserError) as info:
        find_pairs(root, "train", **LAYOUT)
    message = str(info.value)
    assert "no mask '<name>.png'" in message and "'<name>.jpg' (8 of 8)" in message
    assert "data.mask_suffix=.jpg reads them" in message and "JPEG masks are lossy" in message
    assert not (root / "splits").exists()  # nothing written into the user's folder while its masks are not found


def test_one_doctor_run_reports_every_problem_of_the_newcomer_folder(tmp_path):
    root = write_newcomer_folder(tmp_path / "d")
    report, usable = _doctor(root, tmp_path)
    assert not usable
    kinds = {p["kind"] for s in report["splits"].values() for p in s["problems"]}
    assert {"masks_under_other_suffix", "lossy_mask", "interpolated_binary_masks"} <= kinds
    assert "default_split_written" not in kinds  # the folder is not usable: nothing written into it
    mismatched = sum(
        p["count"] for s in report["splits"].values() for p in s["problems"] if p["kind"] == "size_mismatch"
    )
    assert mismatched == 2
    messages = " ".join(p["message"] for s in report["splits"].values() for p in s["problems"])
    assert "data.mask_suffix=.jpg" in messages and "data.label_map={255:1}" in messages
    assert "num_classes=" not in messages  # never a class count from the JPEG noise
    assert not (root / "splits").exists()


def test_masks_in_a_folder_of_another_common_name_are_named_with_the_key(tmp_path):
    root = write_folder(tmp_path / "d")
    (root / "masks").rename(root / "labels")
    with pytest.raises(UserError, match=r"if labels/ holds the masks: data.mask_dir=labels"):
        list_split(root, "train", split_file=None)
