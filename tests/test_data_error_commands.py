"""After a data error at training time, the commands printed run as printed: the full report and the repair carry
every data setting the user gave; data=folder's own crop, larger than most images, is said with the crop that fits.

WIRING: these need two lines the lead adds to files another helper owns (see the fix helper's report):
fcn/data/build.py::scan_data ends its UserError with ``doctor_lines(data, kinds)`` and fcn/train.py logs
``folder_crop_warning(data, train_sizes)``. Until then they are expected to fail (strict: remove the marker
once wired)."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fcn.data.build import scan_data
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import image_array, save, write_folder

REPO = Path(__file__).resolve().parents[1]


def _run(command: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "python"
    return subprocess.run(
        [sys.executable, *words[1:], f"hydra.run.dir={tmp_path / name}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_full_report_and_repair_commands_after_a_data_error_run_as_printed(tmp_path):
    root = tmp_path / "my data"
    for i in range(3):
        save(image_array(24, 32, i), root / "images" / f"p{i}.jpg")
        mask = np.zeros((24, 32), np.uint8)
        mask[5:20, 4:20] = 255
        save(mask, root / "masks" / f"p{i}.jpg", quality=80)
    overrides = ["data=folder", f"data.root={root}", "data.num_classes=2", "data.class_names=[bg,fg]"]
    data = compose_config("train", [*overrides, "data.mask_suffix=.jpg", "data.split_file=null"]).data
    with pytest.raises(UserError) as error:
        scan_data(data, [data.train_split])
    lines = str(error.value).splitlines()
    report = next(line for line in lines if line.startswith("Full report: ")).removeprefix("Full report: ")
    repair = next(line for line in lines if line.startswith("Repair into a copy")).split(": ", 1)[1]
    for command in (report, repair):
        assert "data.num_classes=2" in command and "data.mask_suffix=.jpg" in command
    checked = _run(report, tmp_path, "report")
    assert checked.returncode == 1 and "has no value" not in checked.stderr, checked.stderr  # ran: not usable
    fixed = _run(repair, tmp_path, "repair")
    assert fixed.returncode == 0, fixed.stderr
    assert "Train on the repaired copy:" in fixed.stdout and Path(f"{root}_fixed", "fix_report.csv").is_file()


@pytest.mark.slow
def test_training_on_a_folder_of_small_images_at_the_folders_own_crop_says_which_crop_fits(tmp_path, caplog):
    from fcn.train import train

    names = [f"n{i}" for i in range(5)]
    root = write_folder(tmp_path / "d", names=names, size=(60, 80), split_lists={"train": names[:4], "val": names[4:]})
    write_folder(root, names=["big"], size=(520, 520))  # one image fills the crop: most do not
    (root / "splits" / "train.txt").write_text("".join(f"{n}\n" for n in [*names[:4], "big"]))
    cfg = compose_config(
        "train",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=2",
            "data.class_names=[a,b]",
            "trainer=debug",
            "trainer.epochs=1",
            "trainer.batch_size=2",
            "logger=none",
        ],
    )
    with caplog.at_level(logging.WARNING):
        train(cfg, tmp_path / "run")
    assert any("larger than 4 of the 5 training images" in r.getMessage() for r in caplog.records)
    assert any("data.crop_size=32 fits 100% of them" in r.getMessage() for r in caplog.records)
