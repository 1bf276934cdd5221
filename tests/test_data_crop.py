"""The crop follows the data: data=folder's own crop_size, larger than most images of a folder, is said in one line
with the crop that fits them."""

from __future__ import annotations

from fcn.cli.check_data import run_check
from fcn.data.doctor.crop import crop_advice, folder_crop_warning
from tests.conftest import compose_config
from tests.layouts import write_folder


def test_a_crop_larger_than_most_images_names_the_crop_that_fits_them():
    advice = crop_advice((512, 512), {"500x375": 80, "640x480": 15, "1024x768": 5})
    assert advice is not None and "\n" not in advice
    assert "larger than 95 of the 100 training images" in advice and "data.crop_size=352" in advice
    assert crop_advice((512, 512), {"1024x768": 9, "500x375": 1}) is None  # most images fill it
    assert crop_advice((512, 512), {}) is None


def test_only_data_folder_at_its_own_crop_is_warned():
    sizes = {"320x240": 10}
    folder = ["data=folder", "data.root=x", "data.num_classes=2", "data.class_names=[a,b]"]
    assert "data.crop_size=224" in folder_crop_warning(compose_config("train", folder).data, sizes)
    assert folder_crop_warning(compose_config("train", [*folder, "data.crop_size=200"]).data, sizes) is None
    assert folder_crop_warning(compose_config("train", ["data=camvid"]).data, sizes) is None


def test_the_doctor_suggests_the_crop_for_a_folder_of_small_images(tmp_path, capsys):
    root = write_folder(tmp_path / "d", names=("a", "b", "c"), size=(60, 80))
    cfg = compose_config(
        "check_data", ["data=folder", f"data.root={root}", "data.num_classes=2", "data.class_names=[a,b]"]
    )
    report, _ = run_check(cfg, tmp_path / "report")
    assert any("data.crop_size=32" in s for s in report["suggestions"])
    assert "suggestion: data.crop_size=512 is larger than 2 of the 2 training images" in capsys.readouterr().out
