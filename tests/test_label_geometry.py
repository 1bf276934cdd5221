"""Labels stay where the pixels are: mask resizes aligned with image resizes, predictions named
after the inputs' subfolders, and EXIF-rotated photos never predicted sideways in silence."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from fcn.data.transforms import reseed, train_transforms
from fcn.report import PredictionWriter, output_names
from tests.conftest import compose_config


def _mean_mask_offset(seeds: int) -> np.ndarray:
    """Mean (down, right) offset in pixels of the mask's foreground from the image's, where the
    image is the mask itself (0/255) after random scale + crop."""
    transform = train_transforms(crop_size=64, scale_range=(0.5, 2.0), hflip=0.0, color_jitter=0.0)
    rng = np.random.default_rng(0)
    offsets = []
    for seed in range(seeds):
        mask = np.zeros((48, 48), np.uint8)
        y, x = rng.integers(4, 30, 2)
        h, w = rng.integers(6, 16, 2)
        mask[y : y + h, x : x + w] = 1
        reseed(transform, seed)
        out = transform(image=np.repeat((mask * 255)[..., None], 3, 2), mask=mask)
        image_fg, mask_fg = out["image"][..., 0] >= 128, out["mask"] == 1
        if image_fg.any() and mask_fg.any():
            yy, xx = np.mgrid[: image_fg.shape[0], : image_fg.shape[1]]
            offsets.append((yy[mask_fg].mean() - yy[image_fg].mean(), xx[mask_fg].mean() - xx[image_fg].mean()))
    return np.mean(offsets, axis=0)


def test_random_scale_keeps_the_mask_on_its_image_pixels():
    # nearest neighbour of another pixel-centre convention put the mask ~0.45 px down and right
    assert np.all(np.abs(_mean_mask_offset(seeds=400)) < 0.05)


def test_output_names_mirror_subfolders_and_stay_plain_for_one_folder(tmp_path):
    paths = [tmp_path / "images" / cam / "0001.png" for cam in ("cam1", "cam2", "cam3")]
    assert output_names(paths) == ["cam1/0001", "cam2/0001", "cam3/0001"]
    assert output_names([tmp_path / "a.png", tmp_path / "b.jpg"]) == ["a", "b"]


def test_saved_predictions_of_same_named_images_in_subfolders_do_not_overwrite_each_other(tmp_path):
    paths = []
    for cam in ("cam1", "cam2", "cam3"):
        (tmp_path / "images" / cam).mkdir(parents=True)
        Image.new("RGB", (6, 4)).save(tmp_path / "images" / cam / "0001.png")
        paths.append(tmp_path / "images" / cam / "0001.png")
    writer = PredictionWriter(tmp_path / "predictions", paths, palette=[[0, 0, 0], [255, 0, 0]])
    preds = torch.stack([torch.full((4, 6), k % 2) for k in range(3)])
    writer(torch.zeros(3, 3, 4, 6, dtype=torch.uint8), torch.zeros(3, 4, 6, dtype=torch.long), preds)
    for k, cam in enumerate(("cam1", "cam2", "cam3")):
        written = np.asarray(Image.open(tmp_path / "predictions" / cam / "0001.png"))
        assert (written == k % 2).all()
        assert (tmp_path / "predictions" / cam / "0001_overlay.jpg").is_file()


def test_predict_mirrors_the_subfolders_of_inputs_with_the_same_name(trained_run, tmp_path):
    from fcn.cli.predict import run_prediction

    for cam in ("cam1", "cam2"):
        (tmp_path / "in" / cam).mkdir(parents=True)
        Image.new("RGB", (40, 32), (40, 80, 120)).save(tmp_path / "in" / cam / "0001.png")
    out = tmp_path / "out"
    cfg = compose_config(
        "predict",
        [f"checkpoint={trained_run / 'checkpoints' / 'best.pt'}", f"input={tmp_path}/in/*/0001.png", f"output={out}"],
    )
    written, failed = run_prediction(cfg)
    assert len(written) == 2 and not failed
    assert (out / "cam1" / "0001.png").is_file() and (out / "cam2" / "0001.png").is_file()


def _photo_with_orientation(path, orientation: int) -> None:
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)


def test_predict_warns_for_each_photo_with_an_exif_orientation_and_can_apply_it(trained_run, tmp_path, caplog):
    from fcn.cli.predict import run_prediction

    (tmp_path / "in").mkdir()
    _photo_with_orientation(tmp_path / "in" / "turned.jpg", 6)
    _photo_with_orientation(tmp_path / "in" / "turned_too.jpg", 8)
    Image.new("RGB", (40, 24)).save(tmp_path / "in" / "plain.jpg")
    ckpt = trained_run / "checkpoints" / "best.pt"
    with caplog.at_level(logging.WARNING):
        run_prediction(
            compose_config(
                "predict", [f"checkpoint={ckpt}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'stored'}"]
            )
        )
    warned = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert len(warned) == 2 and any("turned.jpg" in m for m in warned) and not any("plain" in m for m in warned)
    assert Image.open(tmp_path / "stored" / "turned.png").size == (40, 24)  # as stored
    upright = [f"checkpoint={ckpt}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'upright'}"]
    run_prediction(compose_config("predict", [*upright, "apply_exif_orientation=true"]))
    assert Image.open(tmp_path / "upright" / "turned.png").size == (24, 40)  # turned upright first
    assert Image.open(tmp_path / "upright" / "plain.png").size == (40, 24)


def test_evaluate_saves_predictions_mirroring_the_dataset_subfolders(trained_run, tmp_path):
    from fcn.cli.evaluate import run_evaluation

    root = tmp_path / "data"
    (root / "splits").mkdir(parents=True)
    for cam in ("cam1", "cam2", "cam3"):
        for folder in ("images", "masks"):
            (root / folder / cam).mkdir(parents=True)
        Image.new("RGB", (32, 24), (10, 20, 30)).save(root / "images" / cam / "0001.png")
        Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "masks" / cam / "0001.png")
    (root / "splits" / "val.txt").write_text("cam1/0001\ncam2/0001\ncam3/0001\n")
    overrides = [
        "data=folder",
        f"data.root={root}",
        "data.recursive=true",
        "data.num_classes=6",
        "data.class_names=[a,b,c,d,e,f]",
        "data.split=val",
        "eval.save_predictions=true",
    ]
    cfg = compose_config("evaluate", [f"checkpoint={trained_run / 'checkpoints' / 'best.pt'}", *overrides])
    assert run_evaluation(cfg, tmp_path / "eval", overrides=overrides)["images"] == 3
    for cam in ("cam1", "cam2", "cam3"):
        assert (tmp_path / "eval" / "predictions" / cam / "0001.png").is_file()
