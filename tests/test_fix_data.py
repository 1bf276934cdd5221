"""fix_data.py writes a repaired copy of a dataset: each defect the doctor diagnoses, made in a tiny folder here,
comes out repaired pixel for pixel; the original is never changed; every command printed runs as printed."""

from __future__ import annotations

import csv
import hashlib
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn.cli.fix_data import run_fix
from fcn.data.doctor.commands import check_data_command, doctor_lines, fix_data_command, train_command
from fcn.data.doctor.fix import FIXABLE
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import image_array, save

REPO = Path(__file__).resolve().parents[1]
BINARY = ["data=folder", "data.num_classes=2", "data.class_names=[bg,fg]", "data.split_file=null", "cache=false"]


def _labels(h=24, w=32, classes=(0, 1, 2), seed=0) -> np.ndarray:
    """Blocks of classes, as a labelling tool draws them."""
    labels = np.zeros((h, w), np.uint8)
    labels[4 : h - 4, 4 : w // 2] = classes[1]
    labels[h // 3 : h - 2, w // 2 : w - 3] = classes[-1]
    return labels


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _fix(tmp_path, root: Path, overrides: list[str]) -> tuple[Path, object, bool]:
    out = tmp_path / "fixed"
    before = _tree(root)
    result, usable = run_fix(compose_config("fix_data", [*overrides, f"data.root={root}", f"out={out}"]))
    assert _tree(root) == before  # the original is only read
    return out, result, usable


def _report(out: Path) -> list[dict]:
    with (out / "fix_report.csv").open() as f:
        return list(csv.DictReader(f))


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as mask:
        assert mask.format == "PNG" and mask.mode in ("L", "P")
        return np.asarray(mask)


def test_jpeg_masks_with_noise_are_snapped_to_their_class_values_and_saved_as_png(tmp_path):
    root = tmp_path / "d"
    truth = {}
    for i in range(3):
        truth[f"m{i}"] = _labels(seed=i)
        save(image_array(24, 32, i), root / "images" / f"m{i}.jpg")
        stored = np.array([0, 100, 200], np.uint8)[truth[f"m{i}"]]  # classes 1 and 2 stored as 100 and 200
        save(stored, root / "masks" / f"m{i}.jpg", quality=70)  # noise along every edge
    overrides = ["data=folder", "data.num_classes=3", "data.class_names=[a,b,c]", "data.mask_suffix=.jpg"]
    out, result, usable = _fix(tmp_path, root, [*overrides, "data.label_map={100:1,200:2}"])
    assert usable
    for name, labels in truth.items():
        fixed = _mask(out / "masks" / f"{name}.png")
        np.testing.assert_array_equal(fixed, labels)  # the noise is far smaller than the steps between classes
    kinds = {row["change"] for row in _report(out)}
    assert {"mask_saved_as_png", "mask_snapped", "mask_labels_applied"} <= kinds


def test_anti_aliased_png_edges_of_binary_masks_become_0_and_1(tmp_path, capsys):
    root = tmp_path / "d"
    sharp = np.zeros((48, 64), np.uint8)
    sharp[10:40, 12:50] = 255
    soft = np.asarray(Image.fromarray(sharp).resize((32, 24), Image.Resampling.BILINEAR))  # in-between values
    for i in range(3):
        save(image_array(24, 32, i), root / "images" / f"s{i}.jpg")
        save(soft, root / "masks" / f"s{i}.png")
    out, result, usable = _fix(tmp_path, root, BINARY)
    assert usable
    fixed = _mask(out / "masks" / "s0.png")
    np.testing.assert_array_equal(fixed, (soft >= 128).astype(np.uint8))
    assert result.counts()["mask_snapped"] == 3 and result.counts()["mask_binary_255_to_1"] == 3
    printed = capsys.readouterr().out
    assert "mask_snapped: 3" in printed and "anti-aliased edges" in printed


def test_0_255_masks_become_0_1_and_the_image_is_copied_byte_for_byte(tmp_path):
    root = tmp_path / "d"
    labels = _labels(classes=(0, 255, 255))
    save(image_array(24, 32), root / "images" / "a.jpg")
    save(labels, root / "masks" / "a.png")
    save(image_array(24, 32, 1), root / "images" / "b.jpg")
    save(labels, root / "masks" / "b.png")
    out, _, usable = _fix(tmp_path, root, BINARY)
    assert usable
    np.testing.assert_array_equal(_mask(out / "masks" / "a.png"), labels // 255)
    assert (out / "images" / "a.jpg").read_bytes() == (root / "images" / "a.jpg").read_bytes()


def test_rgb_colour_masks_become_class_indices_through_the_palette(tmp_path):
    root = tmp_path / "d"
    palette = [[0, 0, 0], [200, 0, 0], [0, 0, 200]]
    labels = _labels()
    colour = np.array(palette, np.uint8)[labels]
    for name in ("a", "b"):
        save(image_array(24, 32), root / "images" / f"{name}.jpg")
        save(colour, root / "masks" / f"{name}.png")
    overrides = [
        "data=folder",
        "data.num_classes=3",
        "data.class_names=[a,b,c]",
        "data.palette=[[0,0,0],[200,0,0],[0,0,200]]",
        "data.split_file=null",
    ]
    out, result, usable = _fix(tmp_path, root, overrides)
    assert usable
    np.testing.assert_array_equal(_mask(out / "masks" / "a.png"), labels)
    assert result.counts()["mask_colours_to_classes"] == 2


@pytest.mark.parametrize("resize", ["image_to_mask", "mask_to_image"])
def test_a_size_mismatch_is_resized_the_way_the_user_picks(tmp_path, resize):
    root = tmp_path / "d"
    labels = _labels(48, 64, classes=(0, 1, 1))
    save(image_array(24, 32), root / "images" / "a.png")  # half the mask's size
    save(labels, root / "masks" / "a.png")
    save(image_array(48, 64, 1), root / "images" / "b.png")  # twice the mask's size
    save(labels[::2, ::2].copy(), root / "masks" / "b.png")
    out, result, usable = _fix(tmp_path, root, [*BINARY, f"resize={resize}"])
    assert usable
    with Image.open(out / "images" / "a.png") as a_image, Image.open(out / "images" / "b.png") as b_image:
        sizes = a_image.size, b_image.size
    if resize == "image_to_mask":
        assert sizes == ((64, 48), (32, 24))
        np.testing.assert_array_equal(_mask(out / "masks" / "a.png"), labels)  # the labels stay exact
        assert result.counts()["image_resized"] == 2
    else:
        assert sizes == ((32, 24), (64, 48))
        np.testing.assert_array_equal(_mask(out / "masks" / "a.png"), labels[1::2, 1::2])  # nearest: the centre's label
        assert set(np.unique(_mask(out / "masks" / "b.png"))) <= {0, 1}  # no new values
        assert (out / "images" / "a.png").read_bytes() == (root / "images" / "a.png").read_bytes()
        assert result.counts()["mask_resized"] == 2


def test_an_exif_rotated_image_is_turned_to_match_its_mask(tmp_path):
    root = tmp_path / "d"
    stored = image_array(24, 32)  # 32 wide, 24 high as stored; orientation 6 shows it 24 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "images").mkdir(parents=True)
    Image.fromarray(stored).save(root / "images" / "r.png", exif=exif)
    save(_labels(32, 24, classes=(0, 1, 1)), root / "masks" / "r.png")  # drawn on the rotated view
    save(image_array(24, 32, 1), root / "images" / "plain.png")
    save(_labels(24, 32, classes=(0, 1, 1)), root / "masks" / "plain.png")
    out, result, usable = _fix(tmp_path, root, BINARY)
    assert usable
    with Image.open(out / "images" / "r.png") as fixed:
        assert fixed.size == (24, 32) and fixed.getexif().get(0x0112, 1) == 1
        np.testing.assert_array_equal(np.asarray(fixed), np.rot90(stored, -1))  # orientation 6: 90 degrees clockwise
    assert result.counts()["exif_rotation_applied"] == 1


def test_16_bit_images_become_8_bit_as_the_doctor_describes(tmp_path):
    root = tmp_path / "d"
    twelve = (np.arange(24 * 32).reshape(24, 32) * 5 % 4096).astype(np.uint16)  # 12-bit camera data
    full = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)
    (root / "images").mkdir(parents=True)
    Image.fromarray(twelve).save(root / "images" / "dark.png")
    Image.fromarray(full).save(root / "images" / "full.png")
    for name in ("dark", "full"):
        save(_labels(classes=(0, 1, 1)), root / "masks" / f"{name}.png")
    out, result, usable = _fix(tmp_path, root, BINARY)
    assert usable
    with Image.open(out / "images" / "dark.png") as dark, Image.open(out / "images" / "full.png") as wide:
        np.testing.assert_array_equal(np.asarray(dark), np.round(twelve.astype(float) * 255 / 4095).astype(np.uint8))
        np.testing.assert_array_equal(np.asarray(wide), np.round(full / 257).astype(np.uint8))
    assert result.counts()["image_16_bit_to_8_bit"] == 2


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_rgb_images_are_read_at_full_depth_said_by_the_doctor_and_made_8_bit(tmp_path, suffix):
    import cv2

    from fcn.cli.check_data import run_check

    root = tmp_path / "d"
    twelve = (np.arange(24 * 32 * 3).reshape(24, 32, 3) * 7 % 4096).astype(np.uint16)  # 12-bit camera data, RGB
    (root / "images").mkdir(parents=True)
    assert cv2.imwrite(str(root / "images" / f"a{suffix}"), twelve[..., ::-1])  # OpenCV writes BGR
    save(_labels(classes=(0, 1, 1)), root / "masks" / "a.png")
    report, _ = run_check(compose_config("check_data", [*BINARY, f"data.root={root}"]), tmp_path / "report")
    kinds = {p["kind"] for split in report["splits"].values() for p in split["problems"]}
    assert "dark_16_bit_images" in kinds  # its real range, not the high bytes Pillow keeps
    out, result, _ = _fix(tmp_path, root, BINARY)
    with Image.open(out / "images" / f"a{suffix}") as fixed:
        assert fixed.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(fixed), np.round(twelve.astype(float) * 255 / 4095).astype(np.uint8))
    assert result.counts()["image_16_bit_to_8_bit"] == 1


def test_an_unreadable_pair_is_left_out_and_listed(tmp_path, capsys):
    root = tmp_path / "d"
    for name in ("a", "b", "c"):
        save(image_array(24, 32), root / "images" / f"{name}.jpg")
        save(_labels(classes=(0, 1, 1)), root / "masks" / f"{name}.png")
    (root / "images" / "b.jpg").write_bytes((root / "images" / "b.jpg").read_bytes()[:200])  # truncated
    out, result, usable = _fix(tmp_path, root, ["data=folder", "data.num_classes=2", "data.class_names=[bg,fg]"])
    assert usable
    assert not (out / "images" / "b.jpg").exists() and not (out / "masks" / "b.png").exists()
    listed = (out / "splits" / "train.txt").read_text().split() + (out / "splits" / "val.txt").read_text().split()
    assert "b" not in listed and sorted(listed) == ["a", "c"]
    rows = [r for r in _report(out) if r["change"] == "left_out"]
    assert len(rows) == 1 and rows[0]["file"].endswith("b.jpg") and "cannot be decoded" in rows[0]["reason"]
    assert "left out:" in capsys.readouterr().out


def test_the_copy_goes_to_a_new_or_empty_folder_outside_the_data(tmp_path):
    root = tmp_path / "d"
    save(image_array(24, 32), root / "images" / "a.jpg")
    save(_labels(classes=(0, 1, 1)), root / "masks" / "a.png")
    with pytest.raises(UserError, match="inside data.root"):
        run_fix(compose_config("fix_data", [*BINARY, f"data.root={root}", f"out={root / 'fixed'}"]))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        run_fix(compose_config("fix_data", [*BINARY, f"data.root={root}", f"out={tmp_path / 'busy'}"]))
    with pytest.raises(UserError, match="out= is not set"):
        run_fix(compose_config("fix_data", [*BINARY, f"data.root={root}"]))


def test_every_fixable_problem_is_a_kind_the_doctor_reports():
    import inspect

    from fcn.data.doctor import diagnose, scan

    source = inspect.getsource(scan) + inspect.getsource(diagnose)
    assert all(f'"{kind}"' in source for kind in FIXABLE)


def test_the_printed_commands_carry_every_data_setting_the_user_gave(tmp_path):
    root = tmp_path / "my data"
    overrides = [f"data.root={root}", "data.num_classes=2", "data.class_names=[bg,fg]", "data.label_map={255:1}"]
    data = compose_config("check_data", ["data=folder", *overrides]).data
    words = shlex.split(check_data_command(data))
    assert words[:3] == ["python", "scripts/check_data.py", "data=folder"]
    assert {f"data.root={root}", "data.num_classes=2", "data.class_names=[bg,fg]", "data.label_map={255:1}"} <= set(
        words
    )
    fix = shlex.split(fix_data_command(data, tmp_path / "out"))
    assert fix[1] == "scripts/fix_data.py" and f"out={tmp_path / 'out'}" in fix
    train = shlex.split(train_command(data, tmp_path / "out"))
    assert f"data.root={tmp_path / 'out'}" in train and not any("label_map" in w for w in train)  # masks decoded
    assert "Repair into a copy" in doctor_lines(data, {"lossy_mask"})
    assert "Repair" not in doctor_lines(data, {"values_out_of_range"})
    # colour masks need data.palette first: no command that cannot run as printed, the fix instead
    colours = doctor_lines(data, {"rgb_mask_no_palette", "lossy_mask"})
    assert "fix_data.py data=" not in colours and "data.palette=[[r,g,b],...]" in colours
    ade = shlex.split(train_command(compose_config("check_data", ["data=ade20k"]).data, tmp_path / "out"))
    assert "data.reduce_zero_label=false" in ade  # the option's own label setting is undone for a decoded copy


def test_the_doctor_names_the_fix_data_command_for_a_folder_it_can_repair(tmp_path, capsys):
    from fcn.cli.check_data import run_check

    root = tmp_path / "d"
    save(image_array(24, 32), root / "images" / "a.jpg")
    save(_labels(classes=(0, 255, 255)), root / "masks" / "a.jpg")
    cfg = compose_config("check_data", [*BINARY[:4], f"data.root={root}", "data.mask_suffix=.jpg", "cache=false"])
    run_check(cfg, tmp_path / "report")
    printed = capsys.readouterr().out
    assert "Repair into a copy" in printed and "python scripts/fix_data.py data=folder" in printed
    assert "data.mask_suffix=.jpg" in printed.split("Repair into a copy")[1]


def _run_printed(command: str, extra: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "python"
    return subprocess.run(
        [sys.executable, *words[1:], *extra, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_printed_train_command_trains_on_the_repaired_copy(tmp_path, capsys):
    root = tmp_path / "messy"
    for i in range(6):
        labels = _labels(24, 32, classes=(0, 255, 255), seed=i)
        size = (16, 12) if i == 5 else (32, 24)  # one image at another size than its mask
        save(np.asarray(Image.fromarray(image_array(24, 32, i)).resize(size)), root / "images" / f"p{i}.jpg")
        save(labels, root / "masks" / f"p{i}.jpg", quality=80)
    overrides = ["data=folder", "data.num_classes=2", "data.class_names=[bg,fg]", "data.mask_suffix=.jpg"]
    out, _, usable = _fix(tmp_path, root, overrides)
    assert usable
    printed = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert printed.startswith("python scripts/train.py data=folder")
    tiny = ["trainer=debug", "trainer.epochs=1", "trainer.batch_size=2", "data.crop_size=16", "logger=none"]
    result = _run_printed(printed, tiny, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints").is_dir() or any((tmp_path / "run").rglob("*.pt"))


@pytest.mark.slow
def test_the_printed_full_report_command_runs_as_printed(tmp_path):
    root = tmp_path / "d"
    save(image_array(24, 32), root / "images" / "a.jpg")
    save(_labels(classes=(0, 1, 5)), root / "masks" / "a.png")  # 5 is no class: the data has an error
    overrides = ["data=folder", f"data.root={root}", "data.num_classes=2", "data.class_names=[bg,fg]"]
    data = compose_config("check_data", [*overrides, "data.split_file=null"]).data
    result = _run_printed(check_data_command(data), [], tmp_path)
    assert result.returncode == 1, result.stderr  # the report ran (1: not usable), no settings error (2)
    assert "has no value" not in result.stderr and "verdict: NOT usable" in result.stdout


def test_an_exif_tag_the_mask_contradicts_is_dropped_and_the_pixels_kept(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    stored = image_array(24, 32)
    exif = Image.Exif()
    exif[0x0112] = 8  # viewers would show it 24 wide, 32 high
    Image.fromarray(stored).save(root / "images" / "r.png", exif=exif)
    save(_labels(24, 32, classes=(0, 1, 1)), root / "masks" / "r.png")  # drawn on the stored pixels
    out, result, usable = _fix(tmp_path, root, BINARY)
    assert usable
    with Image.open(out / "images" / "r.png") as fixed:
        assert fixed.getexif().get(0x0112, 1) == 1
        np.testing.assert_array_equal(np.asarray(fixed), stored)
    assert result.counts()["exif_tag_dropped"] == 1


def test_floating_point_images_in_0_1_become_8_bit_and_other_ranges_are_left_out(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    unit = (np.arange(24 * 32).reshape(24, 32) / (24 * 32 - 1)).astype(np.float32)
    Image.fromarray(unit, mode="F").save(root / "images" / "unit.tif")
    Image.fromarray(unit * 1000 - 3, mode="F").save(root / "images" / "odd.tif")
    for name in ("unit", "odd"):
        save(_labels(classes=(0, 1, 1)), root / "masks" / f"{name}.png")
    out, result, usable = _fix(tmp_path, root, BINARY)
    assert usable
    with Image.open(out / "images" / "unit.tif") as fixed:
        assert fixed.mode == "L"
        np.testing.assert_array_equal(np.asarray(fixed), np.round(unit * 255).astype(np.uint8))
    assert [c.file for c in result.left_out] == [str(root / "images" / "odd.tif")]
    assert "no known range" in result.left_out[0].reason


def test_jpeg_colour_masks_take_the_nearest_palette_colour(tmp_path):
    root = tmp_path / "d"
    palette = np.array([[0, 0, 0], [220, 20, 20], [20, 20, 220]], np.uint8)
    labels = _labels(48, 64)
    save(image_array(48, 64), root / "images" / "a.jpg")
    save(palette[labels], root / "masks" / "a.jpg", quality=90)  # off-palette colours along every edge
    overrides = [
        "data=folder",
        "data.num_classes=3",
        "data.class_names=[a,b,c]",
        "data.palette=[[0,0,0],[220,20,20],[20,20,220]]",
        "data.mask_suffix=.jpg",
        "data.split_file=null",
    ]
    out, result, usable = _fix(tmp_path, root, overrides)
    assert usable
    fixed = _mask(out / "masks" / "a.png")
    assert set(np.unique(fixed)) <= {0, 1, 2} and (fixed == labels).mean() > 0.99
    assert result.counts()["mask_colours_snapped"] == 1


def test_a_repaired_image_keeps_the_name_data_image_suffix_gives_it(tmp_path):
    root = tmp_path / "d"
    save(image_array(12, 16), root / "images" / "a_rgb.jpg")
    save(_labels(24, 32, classes=(0, 1, 1)), root / "masks" / "a.png")
    out, _, usable = _fix(tmp_path, root, [*BINARY, "data.image_suffix=_rgb.jpg"])
    assert usable  # the copy is read with the same data.image_suffix
    with Image.open(out / "images" / "a_rgb.jpg") as fixed:
        assert fixed.format == "JPEG" and fixed.size == (32, 24)


@pytest.mark.parametrize(("foreground_rows", "advised"), [(12, False), (2, True)])
def test_the_doctor_advises_class_weights_only_where_the_classes_are_imbalanced(tmp_path, foreground_rows, advised):
    from fcn.cli.check_data import run_check

    root = tmp_path / "d"
    labels = np.zeros((24, 32), np.uint8)
    labels[:foreground_rows] = 1  # 12 of 24 rows: an even split; 2 of 24: foreground 11x rarer
    save(image_array(24, 32), root / "images" / "a.jpg")
    save(labels, root / "masks" / "a.png")
    report, _ = run_check(compose_config("check_data", [*BINARY, f"data.root={root}"]), tmp_path / "report")
    assert any(s.startswith("class imbalance") for s in report["suggestions"]) == advised
