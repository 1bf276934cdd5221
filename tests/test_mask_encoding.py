"""A mask encoding that disagrees with the data config is named, with the fix that fits it, before training.

Every case writes a tiny folder and scans it as training and the doctor do; the fix offered must be
the one for that encoding, never a class count taken from a stray value.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fcn.data.build import data_layout, mask_decoder, scan_data
from fcn.data.doctor.scan import scan_split
from fcn.data.folder import find_pairs, list_split
from fcn.data.labels import MaskDecoder
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import VOC_PALETTE, image_array, mask_array, save, write_cityscapes, write_folder, write_voc

LAYOUT = {"split_file": None}


def _scan(root, num_classes=2, **decoder):
    return scan_split(root, "train", LAYOUT, MaskDecoder(num_classes, **decoder), cache=False)


def _kinds(report) -> set[str]:
    return {p.kind for p in report.problems}


def _text(report) -> str:
    return "\n".join(p.message for p in report.problems)


def _interpolated_binary_mask(h=24, w=32) -> np.ndarray:
    """A 0/255 square resized bilinearly: 0 and 255 dominate, in-between values only along the edges."""
    big = np.zeros((h * 4, w * 4), np.uint8)
    big[h : 3 * h, w : 3 * w] = 255
    return np.asarray(Image.fromarray(big).resize((w, h), Image.BILINEAR))


def _write_interpolated(root, n=3):
    for i in range(n):
        save(image_array(24, 32, i), root / "images" / f"m{i}.jpg")
        save(_interpolated_binary_mask(), root / "masks" / f"m{i}.png")
    return root


def test_interpolated_binary_masks_say_the_foreground_is_ignored_and_never_suggest_a_class_count(tmp_path):
    root = _write_interpolated(tmp_path)
    stored = set(np.unique(_interpolated_binary_mask()).tolist())
    assert {0, 255} < stored and len(stored) > 3  # the fixture really has stray edge values
    report = _scan(root)
    assert "interpolated_binary_masks" in _kinds(report)
    text = _text(report)
    assert "every foreground pixel would be ignored" in text
    assert "nearest-neighbour" in text and "threshold them at 128" in text and "data.label_map={255:1}" in text
    assert "num_classes=" not in text


def test_interpolated_binary_masks_with_the_label_map_still_name_the_in_between_values(tmp_path):
    report = _scan(_write_interpolated(tmp_path), label_map={255: 1})
    assert "interpolated_binary_masks" in _kinds(report) and "num_classes=" not in _text(report)
    assert "every foreground pixel" not in _text(report)  # the label map already keeps the foreground


def test_binary_masks_with_a_void_border_are_not_taken_for_interpolated_ones(tmp_path):
    write_folder(tmp_path, values=(0, 1, 1, 1, 1, 1, 1, 1, 255))  # 0/1 masks, 255 border: all fine
    report = _scan(tmp_path)
    assert not report.errors, _text(report)


def test_a_stray_value_never_becomes_the_suggested_class_count(tmp_path):
    write_folder(tmp_path, values=(0, 1))
    save(mask_array(24, 32, [0, 1, 200]), tmp_path / "masks" / "b.png")
    report = _scan(tmp_path)
    assert "values_out_of_range" in _kinds(report)
    assert "data.ignore_index=200" in _text(report) and "num_classes=201" not in _text(report)


def test_cityscapes_label_ids_beside_missing_train_ids_name_the_labelids_config(tmp_path):
    root = write_cityscapes(tmp_path / "cs", mask_kind="labelIds")
    data = compose_config("train", ["data=cityscapes", f"data.root={root}"]).data
    with pytest.raises(UserError) as info:
        find_pairs(root, "train", **data_layout(data))
    assert "_gtFine_labelIds.png" in str(info.value) and "data=cityscapes_labelids" in str(info.value)
    report = scan_split(root, "train", data_layout(data), mask_decoder(data), cache=False)
    assert "masks_under_other_suffix" in _kinds(report) and "data=cityscapes_labelids" in _text(report)
    assert "instanceIds" in _text(report)  # named as what it is: not classes


def test_cityscapes_label_ids_read_as_train_ids_point_to_the_labelids_config_not_to_ignoring(tmp_path):
    root = write_cityscapes(tmp_path / "cs", mask_kind="labelIds")  # values 0, 7, 26, 33
    data = compose_config(
        "train", ["data=cityscapes", f"data.root={root}", "data.mask_suffix=_gtFine_labelIds.png"]
    ).data
    report = scan_split(root, "train", data_layout(data), mask_decoder(data), cache=False)
    assert "cityscapes_label_ids" in _kinds(report) and "data=cityscapes_labelids" in _text(report)
    assert "ignore_index=26" not in _text(report) and "{26:255}" not in _text(report)


def test_cityscapes_label_ids_inside_the_train_id_range_are_not_accepted_silently(tmp_path):
    root = write_cityscapes(tmp_path / "cs", mask_kind="labelIds")
    for mask in (root / "gtFine").rglob("*_gtFine_labelIds.png"):
        save(mask_array(16, 32, [7, 8, 11]), mask)  # road, sidewalk, building: all below 19
    data = compose_config(
        "train", ["data=cityscapes", f"data.root={root}", "data.mask_suffix=_gtFine_labelIds.png"]
    ).data
    report = scan_split(root, "train", data_layout(data), mask_decoder(data), cache=False)
    assert "cityscapes_label_ids" in _kinds(report)
    with pytest.raises(UserError, match="cityscapes_labelids"):
        scan_data(data, ["train"])


def test_classes_stored_as_1_to_n_suggest_reduce_zero_label(tmp_path):
    write_folder(tmp_path, values=(1, 2, 3))
    report = _scan(tmp_path, num_classes=3)
    assert "data.reduce_zero_label=true" in _text(report) and "num_classes=4" not in _text(report)


@pytest.mark.parametrize("factor", [257, 256])
def test_16_bit_masks_scaled_per_class_get_the_label_map_back(tmp_path, factor):
    write_folder(tmp_path, values=(0, 1))
    for name in ("a", "b", "c"):
        values = mask_array(24, 32, [0, 1, 2]).astype(np.uint16) * factor
        Image.fromarray(values).save(tmp_path / "masks" / f"{name}.png")
    report = _scan(tmp_path, num_classes=3)
    assert f"class x {factor}" in _text(report)
    assert f"data.label_map={{{factor}:1,{2 * factor}:2}}" in _text(report)
    assert f"num_classes={2 * factor + 1}" not in _text(report)


def test_values_all_above_num_classes_are_mapped_not_counted(tmp_path):
    write_folder(tmp_path, values=(100, 101, 102))
    report = _scan(tmp_path, num_classes=3)
    assert "data.label_map={100:0,101:1,102:2}" in _text(report) and "num_classes=103" not in _text(report)


def test_colour_masks_saved_as_grey_levels_of_the_palette_are_named(tmp_path):
    # VOC colours black, dark red, dark green in grayscale (ITU-R 601 luma): 0, 38, 75
    write_folder(tmp_path, values=(0, 38, 75))
    report = _scan(tmp_path, num_classes=3, palette=VOC_PALETTE)
    assert "grey_colour_masks" in _kinds(report) and "data.label_map={0:0,38:1,75:2}" in _text(report)
    assert "num_classes=76" not in _text(report)


def test_0_255_masks_with_255_ignored_say_so_with_the_label_map(tmp_path):
    write_folder(tmp_path, values=(0, 255))
    report = _scan(tmp_path)
    assert "binary_masks_ignored" in _kinds(report) and "data.label_map={255:1}" in _text(report)


def test_voc_instance_masks_beside_a_missing_class_folder_are_named(tmp_path):
    root = write_voc(tmp_path / "voc")
    (root / "SegmentationClass").rename(root / "SegmentationObject")
    data = compose_config("train", ["data=voc", f"data.root={root}"]).data
    with pytest.raises(UserError) as info:
        list_split(root, "train", **data_layout(data))
    assert "SegmentationObject/ holds VOC instance masks" in str(info.value)


def test_palette_masks_whose_colours_are_other_classes_of_the_palette_are_named(tmp_path):
    root = write_voc(tmp_path / "voc")
    for mask_path in (root / "SegmentationClass").glob("*.png"):
        with Image.open(mask_path) as mask:
            swapped = mask.copy()
        # the exporting tool's class order: index 1 is drawn in class 2's colour and index 2 in class 1's
        flat = [*VOC_PALETTE[0], *VOC_PALETTE[2], *VOC_PALETTE[1]] + [224, 224, 192] * 253
        swapped.putpalette(flat)
        swapped.save(mask_path)
    data = compose_config("train", ["data=voc", f"data.root={root}"]).data
    report = scan_split(root, "train", data_layout(data), mask_decoder(data), cache=False)
    problem = next(p for p in report.warnings if p.kind == "palette_order")
    assert "index 1 has the colour of class 2" in problem.message and "data.label_map={1:2,2:1}" in problem.message


def test_palette_masks_with_the_config_palette_raise_no_palette_warning(tmp_path):
    root = write_voc(tmp_path / "voc")
    data = compose_config("train", ["data=voc", f"data.root={root}"]).data
    report = scan_split(root, "train", data_layout(data), mask_decoder(data), cache=False)
    assert "palette_order" not in _kinds(report) and not report.errors


def test_rgb_colour_masks_where_index_masks_are_expected_list_their_colours_for_the_palette(tmp_path):
    write_folder(tmp_path)
    colours = np.zeros((24, 32, 3), np.uint8)
    colours[:, 16:] = (128, 0, 0)
    save(colours, tmp_path / "masks" / "a.png")
    report = _scan(tmp_path)
    problem = next(p for p in report.errors if p.kind == "rgb_mask_no_palette")
    assert "its colours: [0,0,0],[128,0,0]" in problem.message and "data.palette=" in problem.message


def test_ignore_colors_on_index_masks_are_named_as_unused(tmp_path):
    write_folder(tmp_path)
    report = _scan(tmp_path, ignore_colors=[[0, 0, 0]])
    problem = next(p for p in report.warnings if p.kind == "ignore_colors_unused")
    assert problem.count == 3 and "data.label_map={value:255}" in problem.message


@pytest.mark.parametrize("foreground", [1000, 128, 100, 65535])
def test_binary_masks_stored_as_zero_and_another_value_get_the_label_map_that_keeps_the_foreground(foreground):
    from fcn.data.doctor.diagnose import _value_fix

    hint = _value_fix([foreground], {0, foreground}, num_classes=2, ignore_index=255, mapped=False)
    assert f"data.label_map={{{foreground}:1}}" in hint
    assert "ignore_index" not in hint and "num_classes" not in hint  # never ignore or count the foreground


def test_masks_that_are_entirely_void_are_not_taken_for_binary_0_255_masks():
    from fcn.data.doctor.diagnose import diagnose_values

    assert diagnose_values({255}, [], num_classes=2, ignore_index=255) == []  # the scan warns: no labelled pixel
    assert [d.kind for d in diagnose_values({0, 255}, [], num_classes=2, ignore_index=255)] == ["binary_masks_ignored"]


def test_a_class_count_suggested_under_a_label_map_counts_the_mapped_values():
    from fcn.data.doctor.diagnose import _value_fix

    hint = _value_fix([5], {0, 1}, num_classes=2, ignore_index=255, mapped=True)  # data.label_map={1:5}
    assert "data.num_classes=6" in hint


def test_labels_kept_only_in_the_alpha_channel_of_rgba_masks_are_an_error_not_a_usable_dataset(tmp_path):
    write_folder(tmp_path)
    for name in ("a", "b", "c"):  # one colour everywhere; the labels are in the alpha channel
        rgba = np.zeros((24, 32, 4), dtype=np.uint8)
        rgba[..., 3] = mask_array(24, 32, [0, 255])
        save(rgba, tmp_path / "masks" / f"{name}.png")
    report = _scan(tmp_path)
    problem = next(p for p in report.errors if p.kind == "alpha_channel_labels")
    assert problem.count == 3 and "alpha channel" in problem.message and "index PNG" in problem.message


def test_rgba_masks_with_a_constant_alpha_are_read_without_an_alpha_complaint(tmp_path):
    write_folder(tmp_path)
    for name in ("a", "b", "c"):
        grey = mask_array(24, 32, [0, 1])
        rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
        save(rgba, tmp_path / "masks" / f"{name}.png")
    assert not {"alpha_channel_labels", "alpha_channel_dropped"} & _kinds(_scan(tmp_path))
