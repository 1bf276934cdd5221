"""Mask pixels become class indices as each dataset's labels say: void classes, palettes, label ids,
reduce_zero_label, label maps, RGB colour masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcn.data.build import build_dataset, scan_data
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import save, write_ade20k, write_camvid, write_cityscapes, write_folder, write_voc


def _data(option: str, root, *extra: str):
    return compose_config("train", [f"data={option}", f"data.root={root}", *extra]).data


def _mask_values(dataset) -> set[int]:
    return {int(v) for i in range(len(dataset)) for v in torch.unique(dataset[i][1])}


def test_camvid_segnet_layout_keeps_void_11_ignored(tmp_path):
    data = _data("camvid", write_camvid(tmp_path))
    reports = scan_data(data, [data.train_split, data.val_split])
    assert [r.pairs for r in reports] == [3, 3] and not any(r.problems for r in reports if r.errors)
    dataset = build_dataset(data, "train", None)
    assert _mask_values(dataset) == {0, 3, 8, 11} and data.ignore_index == 11


def test_voc_palette_masks_are_read_as_indices_with_255_borders(tmp_path):
    data = _data("voc", write_voc(tmp_path / "VOCdevkit" / "VOC2012"))
    train = build_dataset(data, data.train_split, None)
    assert [p[0].name for p in train.pairs] == ["2007_000032.jpg", "2007_000039.jpg"]  # ImageSets order
    assert _mask_values(train) == {0, 1, 2, 255}  # indices, not the palette's colours
    assert len(build_dataset(data, data.val_split, None)) == 1
    assert not scan_data(data, ["train", "val"])[0].errors


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path):
    data = _data("cityscapes_labelids", write_cityscapes(tmp_path, mask_kind="labelIds"))
    # label ids 7 (road), 26 (car), 33 (bicycle), 0 (unlabelled) -> train ids 0, 13, 18, ignore
    assert _mask_values(build_dataset(data, "val", None)) == {0, 13, 18, 255}


def test_ade20k_reduce_zero_label_ignores_other_and_shifts_classes_down(tmp_path):
    data = _data("ade20k", write_ade20k(tmp_path))
    dataset = build_dataset(data, data.train_split, None)
    assert _mask_values(dataset) == {255, 0, 149}  # file values 0, 1, 150
    report = scan_data(data, [data.train_split])[0]
    assert report.class_pixels[0] > 0 and report.class_pixels[149] > 0 and report.ignored_pixels > 0


def test_binary_0_255_masks_train_with_a_label_map(tmp_path):
    root = write_folder(tmp_path, values=(0, 255), split_lists={"train": ["a", "b"], "val": ["c"]})
    extra = ["data.num_classes=2", "data.class_names=[bg,fg]"]
    with pytest.raises(UserError, match=r"data.label_map=\{255:1\}"):
        scan_data(_data("folder", root, *extra), ["train"])
    data = _data("folder", root, *extra, "data.label_map={255:1}")
    assert not scan_data(data, ["train"])[0].errors
    assert _mask_values(build_dataset(data, "train", None)) == {0, 1}


def test_rgb_colour_masks_map_through_the_palette_and_ignore_colours(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[:, 3:6] = palette[1]
    rgb[:, 6:] = palette[2]
    rgb[0, 0] = [255, 255, 255]  # a void colour
    write_folder(tmp_path, names=("a",), size=(8, 9))
    save(rgb, tmp_path / "masks" / "a.png")
    extra = ["data.num_classes=3", "data.class_names=[bg,red,blue]", "data.split_file=null", f"data.palette={palette}"]
    with pytest.raises(UserError, match=r"colours not in data.palette: \[255, 255, 255\]"):
        scan_data(_data("folder", tmp_path, *extra), ["train"])
    data = _data("folder", tmp_path, *extra, "data.ignore_colors=[[255,255,255]]")
    scan_data(data, ["train"])
    mask = build_dataset(data, "train", None)[0][1]
    assert mask[0, 0] == 255 and mask[1, 0] == 0 and mask[1, 4] == 1 and mask[1, 7] == 2


def test_index_masks_saved_as_gray_rgb_are_read_as_indices(tmp_path, caplog):
    write_folder(tmp_path, names=("a",), size=(6, 8))
    save(np.repeat(np.full((6, 8, 1), 1, np.uint8), 3, axis=2), tmp_path / "masks" / "a.png")
    data = _data("folder", tmp_path, "data.num_classes=2", "data.class_names=[bg,fg]", "data.split_file=null")
    report = scan_data(data, ["train"])[0]
    assert [p.kind for p in report.warnings] == ["rgb_index_masks", "absent_classes"]
    assert _mask_values(build_dataset(data, "train", None)) == {1}
