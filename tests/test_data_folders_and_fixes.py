"""Folders as users have them (linked sub-folders, loops) and nothing written into a user's data
before it is found usable (issue 27, kinds 8 and 9)."""

from __future__ import annotations

import os

import pytest

from fcn.data.folder import find_pairs, list_split
from fcn.errors import UserError
from tests.layouts import image_array, mask_array, save


def _camera(folder, names):
    for name in names:
        save(image_array(8, 8), folder / "images" / f"{name}.jpg")
        save(mask_array(8, 8, [0, 1]), folder / "masks" / f"{name}.png")


def _linked_dataset(tmp_path):
    """root/images/{cam1 (real), cam2 -> elsewhere}, masks likewise: 3 + 3 images."""
    for cam in ("cam1", "cam2"):
        base = tmp_path / ("root" if cam == "cam1" else "elsewhere")
        for i in range(3):
            save(image_array(8, 8, i), base / "images" / cam / f"img{i:02d}.jpg")
            save(mask_array(8, 8, [0, 1]), base / "masks" / cam / f"img{i:02d}.png")
    root = tmp_path / "root"
    for kind in ("images", "masks"):
        os.symlink(tmp_path / "elsewhere" / kind / "cam2", root / kind / "cam2")
    return root


def test_linked_camera_folders_are_followed_with_recursive(tmp_path):
    root = _linked_dataset(tmp_path)
    pairs = find_pairs(root, "train", split_file=None, recursive=True)
    assert len(pairs) == 6
    assert {p.parent.name for p, _ in pairs} == {"cam1", "cam2"}


def test_a_split_list_names_images_in_linked_folders(tmp_path):
    root = _linked_dataset(tmp_path)
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text("cam1/img00\ncam2/img02\ncam2/img01\n")
    pairs = find_pairs(root, "train", split_file="lists/{split}.txt", recursive=True)
    assert [p.relative_to(root / "images").as_posix() for p, _ in pairs] == [
        "cam1/img00.jpg",
        "cam2/img02.jpg",
        "cam2/img01.jpg",
    ]


def test_a_double_star_glob_follows_linked_folders(tmp_path):
    root = _linked_dataset(tmp_path)
    pairs = find_pairs(root, "train", split_file=None, image_glob="**/img0[01].jpg")
    assert sorted(p.relative_to(root / "images").as_posix() for p, _ in pairs) == [
        "cam1/img00.jpg",
        "cam1/img01.jpg",
        "cam2/img00.jpg",
        "cam2/img01.jpg",
    ]


def test_a_link_loop_is_one_line_naming_the_link(tmp_path):
    root = _linked_dataset(tmp_path)
    os.symlink(root / "images", root / "images" / "cam1" / "again")
    with pytest.raises(UserError) as err:
        find_pairs(root, "train", split_file=None, recursive=True)
    message = str(err.value)
    assert "\n" not in message
    assert "loop" in message and str(root / "images" / "cam1" / "again") in message


def test_a_folder_linked_twice_without_a_loop_is_listed_under_both_names(tmp_path):
    root = _linked_dataset(tmp_path)
    for kind in ("images", "masks"):
        os.symlink(tmp_path / "elsewhere" / kind / "cam2", root / kind / "cam2_copy")
    assert len(find_pairs(root, "train", split_file=None, recursive=True)) == 9


def test_a_folder_with_images_missing_masks_gets_no_split_lists_written(tmp_path):
    _camera(tmp_path, ["a", "b", "c", "d"])
    save(image_array(8, 8), tmp_path / "images" / "nomask1.jpg")
    save(image_array(8, 8), tmp_path / "images" / "nomask2.jpg")
    with pytest.raises(UserError, match="2 images .* have no mask"):
        find_pairs(tmp_path, "train")
    assert not (tmp_path / "splits").exists()
    files = list_split(tmp_path, "train")
    assert files.images_without_mask == ["nomask1", "nomask2"] and not files.default_lists
    assert not (tmp_path / "splits").exists()


def test_a_usable_folder_gets_a_default_split_of_its_pairs_only(tmp_path):
    _camera(tmp_path, [f"n{i}" for i in range(10)])
    find_pairs(tmp_path, "train")
    listed = (tmp_path / "splits" / "train.txt").read_text().split() + (
        tmp_path / "splits" / "val.txt"
    ).read_text().split()
    assert sorted(listed) == [f"n{i}" for i in range(10)]
