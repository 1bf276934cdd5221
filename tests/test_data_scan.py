"""Every file checked before training (the scan) with one clear message per problem; the scan cache;
the dataset doctor (check_data); class weights from the scan."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from fcn.cli.check_data import run_check
from fcn.data.build import scan_data, with_class_weights
from fcn.data.doctor.scan import median_frequency_weights, scan_split
from fcn.data.folder import read_image
from fcn.data.labels import MaskDecoder
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import image_array, mask_array, save, write_folder

REPO = Path(__file__).resolve().parents[1]
LAYOUT = {"split_file": None}


def _data(root, *extra: str):
    base = ["data=folder", f"data.root={root}", "data.num_classes=3", "data.class_names=[a,b,c]"]
    base.append("data.split_file=null")
    return compose_config("train", [*base, *extra]).data


def _scan(root, **decoder):
    return scan_split(root, "train", LAYOUT, MaskDecoder(decoder.pop("num_classes", 3), **decoder), cache=False)


def _error(root, *extra) -> str:
    with pytest.raises(UserError) as info:
        scan_data(_data(root, *extra), ["train"])
    return str(info.value)


def test_truncated_image_is_named_before_training(tmp_path):
    write_folder(tmp_path, values=(0, 1, 2))
    path = tmp_path / "images" / "b.jpg"
    path.write_bytes(path.read_bytes()[:300])  # header intact, data cut
    message = _error(tmp_path)
    assert "1 images cannot be decoded (corrupt or truncated" in message and str(path) in message
    assert "python scripts/check_data.py data=folder" in message


def test_mask_size_mismatch_gives_both_sizes_and_the_transposed_hint(tmp_path):
    write_folder(tmp_path, values=(0, 1), size=(24, 32))
    save(mask_array(32, 24, [0, 1]), tmp_path / "masks" / "a.png")  # width and height swapped
    message = _error(tmp_path)
    assert "a.png is 24x32, image" in message and "a.jpg is 32x24" in message and "transposed" in message


def test_mask_values_out_of_range_list_values_files_and_fixes(tmp_path):
    write_folder(tmp_path, values=(0, 1, 2))
    save(mask_array(24, 32, [0, 7]), tmp_path / "masks" / "c.png")
    message = _error(tmp_path)
    assert "outside [0, 3) that are not data.ignore_index=255: 7 in 1 masks" in message
    assert "c.png" in message and "data.num_classes=8" in message and "data.label_map={7:255}" in message


def test_zero_based_other_label_suggests_reduce_zero_label(tmp_path):
    write_folder(tmp_path, values=(0, 1, 2, 3))  # 0 = other, classes 1..3
    assert "data.reduce_zero_label=true" in _error(tmp_path)
    assert not scan_data(_data(tmp_path, "data.reduce_zero_label=true"), ["train"])[0].errors


def test_rgb_mask_without_a_palette_is_an_error_naming_the_key(tmp_path):
    write_folder(tmp_path, values=(0, 1))
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:, :10] = [200, 10, 10]
    save(rgb, tmp_path / "masks" / "a.png")
    message = _error(tmp_path, "data.palette=null")
    assert "a.png is an RGB colour mask but data.palette is not set" in message


def test_jpeg_masks_are_refused_with_the_reason(tmp_path):
    write_folder(tmp_path, values=(0, 1))
    for name in "abc":
        save(mask_array(24, 32, [0, 1]), tmp_path / "masks" / f"{name}.jpg")
    message = _error(tmp_path, "data.mask_suffix=.jpg")
    assert "3 masks are JPEG files: lossy compression" in message and "save masks as PNG" in message


def test_images_without_masks_and_masks_without_images_are_listed_with_counts(tmp_path):
    write_folder(tmp_path, names=("a", "b"), values=(0, 1))
    for i in range(7):
        save(image_array(24, 32), tmp_path / "images" / f"orphan{i}.jpg")
    save(mask_array(24, 32, [0]), tmp_path / "masks" / "lonely.png")
    report = _scan(tmp_path)
    kinds = {p.kind: p for p in report.errors}
    assert kinds["image_without_mask"].count == 7 and kinds["image_without_mask"].files[0] == "orphan0"
    assert kinds["mask_without_image"].files == ["lonely"]
    assert "7 images in" in _error(tmp_path)


def test_misspelled_root_shows_the_absolute_path_and_what_is_there(tmp_path):
    write_folder(tmp_path / "data", values=(0, 1))
    with pytest.raises(UserError, match="dataset root not found: /"):
        scan_data(_data(tmp_path / "dta"), ["train"])
    message = _error(tmp_path / "data", "data.image_dir=imgs")
    assert str((tmp_path / "data" / "imgs").resolve()) in message and "contains images/, masks/" in message
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    message = _error(tmp_path / "empty")
    assert "no files matching '*' ending in .jpg, .jpeg, .png" in message


def test_image_modes_are_converted_with_one_warning_per_kind_and_16_bit_is_scaled(tmp_path, caplog):
    write_folder(tmp_path, names=("a", "b", "c", "d"), values=(0, 1))
    gray = np.full((24, 32), 90, np.uint8)
    save(gray, tmp_path / "images" / "a.png")
    save(gray, tmp_path / "images" / "b.png")
    (tmp_path / "images" / "a.jpg").unlink()
    (tmp_path / "images" / "b.jpg").unlink()
    save(np.dstack([image_array(24, 32), np.full((24, 32), 7, np.uint8)]), tmp_path / "images" / "c.png")
    (tmp_path / "images" / "c.jpg").unlink()
    wide = np.full((24, 32), 65535, np.uint16)
    wide[:, :16] = 32896  # 128 * 257
    Image.fromarray(wide).save(tmp_path / "images" / "d.png")
    (tmp_path / "images" / "d.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        scan_data(_data(tmp_path), ["train"])
    warnings = [r.getMessage() for r in caplog.records if "converted to RGB" in r.getMessage()]
    assert len(warnings) == 3  # grayscale (2 files, one line), RGBA, 16-bit
    assert any("2 images are converted to RGB: 8-bit grayscale" in w for w in warnings)
    assert any("RGBA: the alpha channel dropped" in w for w in warnings)
    image = read_image(tmp_path / "images" / "d.png")
    assert image.shape == (24, 32, 3) and image[0, 0, 0] == 128 and image[0, -1, 0] == 255  # scaled, not clipped
    assert read_image(tmp_path / "images" / "c.png").shape == (24, 32, 3)


def test_exif_orientation_is_ignored_and_reported(tmp_path, caplog):
    write_folder(tmp_path, values=(0, 1))
    image = Image.fromarray(image_array(24, 32))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    image.save(tmp_path / "images" / "a.jpg", exif=exif)
    assert read_image(tmp_path / "images" / "a.jpg").shape == (24, 32, 3)  # stored order, like its mask
    with caplog.at_level(logging.WARNING):
        scan_data(_data(tmp_path), ["train"])
    assert any("1 images carry an EXIF orientation tag, which is ignored" in r.getMessage() for r in caplog.records)


def test_training_on_bad_data_stops_before_the_first_step_and_writes_no_checkpoint(tmp_path):
    from fcn.train import train

    root = write_folder(
        tmp_path / "data",
        names=("a", "b", "c", "d"),
        values=(0, 1, 2),
        split_lists={"train": ["a", "b", "c"], "val": ["d"]},
    )
    save(mask_array(24, 32, [0, 9]), root / "masks" / "b.png")
    cfg = compose_config(
        "train",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=3",
            "data.class_names=[a,b,c]",
            "trainer=debug",
            "data.crop_size=16",
        ],
    )
    with pytest.raises(UserError, match="9 in 1 masks"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_scan_cache_rescans_only_changed_files_and_depends_on_label_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = write_folder(tmp_path / "d", names=("a", "b", "c"), values=(0, 1))

    def scan(**decoder):
        return scan_split(root, "train", LAYOUT, MaskDecoder(3, **decoder))

    assert scan().rescanned == 3
    assert scan().rescanned == 0
    mask = root / "masks" / "b.png"
    save(mask_array(24, 32, [0, 9]), mask)
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    report = scan()
    assert report.rescanned == 1 and report.errors[0].kind == "values_out_of_range"
    assert scan(label_map={9: 2}).rescanned == 3 and not scan(label_map={9: 2}).errors  # other settings, own cache


def test_median_frequency_weights_match_a_hand_computation(tmp_path):
    root = tmp_path / "d"
    # image a (4x4): class 0 on 12 px, class 1 on 4 px; image b: class 0 on 8 px, class 2 on 8 px
    a = np.zeros((4, 4), np.uint8)
    a[0] = 1
    b = np.zeros((4, 4), np.uint8)
    b[2:] = 2
    for name, mask in (("a", a), ("b", b)):
        save(image_array(4, 4), root / "images" / f"{name}.jpg")
        save(mask, root / "masks" / f"{name}.png")
    report = _scan(root)
    # freq0 = 20/32, freq1 = 4/16, freq2 = 8/16; median 0.5
    assert median_frequency_weights(report) == [0.8, 2.0, 1.0]
    loss = compose_config("train", ["loss=ce_dice", "loss.losses.0.class_weights=auto"]).loss
    data = OmegaConf.create({"num_classes": 3, "name": "d"})
    assert list(with_class_weights(loss, data, report).losses[0].class_weights) == [0.8, 2.0, 1.0]
    bad = compose_config("train", ["loss.class_weights=[1,2]"]).loss
    with pytest.raises(UserError, match=r"one weight per class \(3 for d\)"):
        with_class_weights(bad, data, report)


def test_doctor_reports_usable_data_with_frequencies_and_weights(tmp_path):
    root = write_folder(tmp_path / "d", values=(0, 1, 2), split_lists={"train": ["a", "b"], "val": ["c"]})
    cfg = compose_config(
        "check_data",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=3",
            "data.class_names=[a,b,c]",
            f"report={tmp_path / 'r.json'}",
        ],
    )
    report, usable = run_check(cfg, tmp_path)
    assert usable and report == json.loads((tmp_path / "r.json").read_text())
    train = report["splits"]["train"]
    assert train["pairs"] == 2 and train["image_sizes"] == {"32x24": 2} and train["mask_values"] == [0, 1, 2]
    assert sum(train["class_frequency"]) == pytest.approx(1.0) and len(report["class_weights_median_frequency"]) == 3


@pytest.mark.slow
def test_doctor_exits_non_zero_on_bad_data_and_lists_every_problem(tmp_path):
    root = write_folder(tmp_path / "d", values=(0, 1, 2), split_lists={"train": ["a", "b"], "val": ["c"]})
    save(mask_array(24, 32, [0, 5]), root / "masks" / "a.png")
    (root / "images" / "c.jpg").write_bytes(b"not an image")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "check_data.py"),
            "data=folder",
            f"data.root={root}",
            "data.num_classes=3",
            "data.class_names=[a,b,c]",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "ERROR mask values outside [0, 3)" in result.stdout and "a.png" in result.stdout
    assert "ERROR 1 images cannot be decoded" in result.stdout and "c.jpg" in result.stdout
    assert "verdict: NOT usable" in result.stdout
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["usable"] is False
    assert {p["kind"] for s in report["splits"].values() for p in s["problems"]} >= {
        "values_out_of_range",
        "corrupt_image",
    }


def test_a_glob_selects_a_split_without_calling_the_other_masks_orphans(tmp_path):
    write_folder(tmp_path, names=("seq01_a", "seq01_b", "seq02_a"), values=(0, 1))
    assert not scan_data(_data(tmp_path, "data.image_glob=seq01_*"), ["train"])[0].errors


def test_an_empty_split_list_is_named(tmp_path):
    write_folder(tmp_path, values=(0, 1), split_lists={"val": []})
    with pytest.raises(UserError, match=r"split list .*val.txt names no images \(check data.split_file\)"):
        scan_data(_data(tmp_path, "data.split_file='splits/{split}.txt'"), ["val"])


def test_class_weights_on_a_loss_without_them_name_the_key_to_use(tmp_path):
    data = OmegaConf.create({"num_classes": 11, "name": "camvid"})
    loss = compose_config("train", ["experiment=camvid", "loss=ce_dice"]).loss
    with pytest.raises(UserError, match="loss.class_weights is set but WeightedSum .* loss.losses.0.class_weights"):
        with_class_weights(loss, data, None)


def test_a_value_that_reduce_zero_label_would_shift_onto_ignore_index_is_an_error(tmp_path):
    write_folder(tmp_path, values=(0, 1, 12))  # 12 - 1 = 11 = ignore_index
    message = _error(tmp_path, "data.reduce_zero_label=true", "data.ignore_index=11")
    assert "stored value 12 becomes data.ignore_index=11 after reduce_zero_label" in message


def test_12_bit_images_warn_and_16_bit_masks_beyond_the_table_are_collected_not_raised(tmp_path):
    write_folder(tmp_path, names=("a", "b"), values=(0, 1))
    Image.fromarray(np.full((24, 32), 4000, np.uint16)).save(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "a.jpg").unlink()
    Image.fromarray(np.full((24, 32), 70000, np.int32)).save(tmp_path / "masks" / "b.tif")
    (tmp_path / "masks" / "b.png").rename(tmp_path / "masks" / "b_old.png")
    report = scan_split(tmp_path, "train", {"split_file": None, "image_glob": "a.*"}, MaskDecoder(3), cache=False)
    assert [p.kind for p in report.warnings][:1] == ["dark_16_bit_images"]
    masks = scan_split(
        tmp_path, "train", {"split_file": None, "mask_suffix": ".tif", "image_glob": "b.*"}, MaskDecoder(3), cache=False
    )
    assert [p.kind for p in masks.errors] == ["bad_mask"] and "outside 0-65535" in masks.errors[0].message


def test_the_doctor_prepares_the_built_in_dataset_like_training(tmp_path, shapes_root):
    from tests.conftest import TINY_SHAPES

    gen = ",".join(f"{k}:{v}" for k, v in TINY_SHAPES.items())
    cfg = compose_config(
        "check_data", [f"data.root={tmp_path / 'fresh'}", f"data.generate={{{gen}}}", f"report={tmp_path / 'r.json'}"]
    )
    report, usable = run_check(cfg, tmp_path)
    assert usable and report["splits"]["train"]["pairs"] == TINY_SHAPES["num_train"]


def test_class_weights_from_too_few_pixels_and_unweighed_absent_classes_are_said_by_name(tmp_path):
    from fcn.data.build import class_weight_warnings

    root = tmp_path / "d"
    a = np.zeros((16, 16), np.uint8)
    a[0, :3] = 1  # class 1: 3 pixels; class 2: none
    save(image_array(16, 16), root / "images" / "a.jpg")
    save(a, root / "masks" / "a.png")
    report = _scan(root)
    rare, absent = class_weight_warnings(report, ["road", "pole", "sign"])
    assert (
        "fewer than 100 train pixels: 'pole'" in rare and "from 3 pixels" in rare and "loss.class_weights=[...]" in rare
    )
    assert absent.startswith("classes with no pixels in the train split get class weight 1.0") and "'sign'" in absent
    assert "'road'" not in rare + absent


def test_jpeg_noise_values_get_no_class_count_or_void_hint_under_save_as_png(tmp_path):
    write_folder(tmp_path, values=(0, 1))
    rng = np.random.default_rng(0)
    for name in "abc":
        noisy = mask_array(24, 32, [0, 1]).astype(int) * 200 + rng.integers(0, 6, (24, 32))  # blurred, noisy edges
        save(np.clip(noisy, 0, 255).astype(np.uint8), tmp_path / "masks" / f"{name}.jpg")
    message = _error(tmp_path, "data.mask_suffix=.jpg")
    diagnosis = message.split("Full report")[0]  # the printed commands carry the user's own settings
    assert "masks are JPEG files" in diagnosis and "JPEG compression noise" in diagnosis
    assert "data.num_classes=" not in diagnosis and "data.ignore_index=" not in diagnosis.split("compression noise")[1]
