"""More than 256 classes end to end: trained, predicted, evaluated, and written losslessly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.visualize import colorize, default_palette, index_png, overlay
from tests.conftest import compose_config

NUM_CLASSES = 300


def _dataset(root):
    """Six 48x48 images; masks (16-bit PNG) mostly class 299, with squares of classes 0, 150, 256, 298."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    stems = [f"img{i}" for i in range(6)]
    for i, stem in enumerate(stems):
        mask = np.full((48, 48), NUM_CLASSES - 1, np.uint16)
        for k, cls in enumerate((0, 150, 256, 298)):
            mask[4 + 10 * k : 12 + 10 * k, 4 + 5 * i : 12 + 5 * i] = cls
        image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        image[mask == NUM_CLASSES - 1] //= 4  # the big class is dark: learnable in a step
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "splits" / "train.txt").write_text("\n".join(stems[:4]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(stems[4:]) + "\n")


def test_index_png_is_lossless_for_any_class_count(tmp_path):
    for classes in (2, 256, 257, 300, 65536):
        mask = (np.arange(48 * 48).reshape(48, 48) * 7919 % classes).astype(np.int64)
        index_png(mask, default_palette(classes)).save(tmp_path / "m.png")
        read = Image.open(tmp_path / "m.png")
        assert read.mode == ("P" if classes <= 256 else "I;16")
        assert np.array_equal(np.asarray(read).astype(np.int64), mask)


def test_index_png_refuses_an_index_its_file_cannot_hold():
    with pytest.raises(ValueError, match="8-bit"):
        index_png(np.array([[256]]), default_palette(256))


def test_default_palette_gives_distinct_colours_beyond_256_classes():
    palette = default_palette(NUM_CLASSES)
    assert len({tuple(c) for c in palette}) == NUM_CLASSES


def test_overlay_paints_every_class_beyond_256_in_its_colour():
    palette = default_palette(NUM_CLASSES)
    image = torch.zeros(3, 2, 2, dtype=torch.uint8)
    mask = torch.tensor([[299, 0], [256, 300]])  # 300 is outside the classes: left as it is
    painted = overlay(image, mask, palette, alpha=1.0)
    assert painted[:, 0, 0].tolist() == palette[299]
    assert painted[:, 1, 0].tolist() == palette[256]
    assert painted[:, 1, 1].tolist() == [0, 0, 0]
    assert colorize(mask[None], palette, ignore_index=65535)[0, :, 0, 0].tolist() == palette[299]


def test_overlay_matches_torchvision_draw_segmentation_masks():
    from torchvision.utils import draw_segmentation_masks

    palette = default_palette(6)
    image = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    mask = torch.randint(0, 6, (9, 7))
    expected = draw_segmentation_masks(
        image, mask == torch.arange(6)[:, None, None], alpha=0.5, colors=[tuple(c) for c in palette]
    )
    assert (overlay(image, mask, palette).int() - expected.int()).abs().max() <= 1


@pytest.mark.slow
def test_300_classes_train_predict_and_evaluate_with_ids_written_exactly(tmp_path):
    from fcn.cli.evaluate import run_evaluation
    from fcn.cli.predict import run_prediction
    from fcn.train import train

    root = tmp_path / "data"
    _dataset(root)
    names = ",".join(f"c{i}" for i in range(NUM_CLASSES))
    run = tmp_path / "run"
    train(
        compose_config(
            "train",
            [
                "data=folder",
                f"data.root={root}",
                f"data.num_classes={NUM_CLASSES}",
                f"data.class_names=[{names}]",
                "data.ignore_index=65535",
                "data.crop_size=48",
                "trainer=debug",
                "trainer.epochs=1",
                "trainer.limit_train_batches=1",
                "trainer.batch_size=4",
                "optim=sgd",
                "optim.lr=0.5",
                "logger.log_every_n_steps=1",
                "logger.num_images=2",  # TensorBoard's comparison grid draws the 300-class masks
            ],
        ),
        run,
    )
    best = run / "checkpoints" / "best.pt"
    written, failed = run_prediction(
        compose_config(
            "predict",
            [f"checkpoint={best}", f"input={root / 'images'}", f"output={tmp_path / 'out'}", "save_probs=true"],
        )
    )
    assert failed == [] and len(written) == 6
    evaluated = tmp_path / "eval"
    run_evaluation(
        compose_config("evaluate", [f"checkpoint={best}", "num_workers=0", "eval.save_predictions=true"]),
        evaluated,
        overrides=[],
    )
    seen = set()
    for stem in ("img4", "img5"):  # the val split, written by both
        predicted = Image.open(tmp_path / "out" / f"{stem}.png")
        assert predicted.mode == "I;16" and predicted.size == (48, 48)
        ids = np.asarray(predicted).astype(np.int64)
        probs = np.load(tmp_path / "out" / f"{stem}.npy").astype(np.float32)
        top2 = np.sort(probs, axis=0)[-2:]
        clear = top2[1] - top2[0] > 1e-2  # float16 probabilities: compare where the winner is plain
        assert np.array_equal(ids[clear], probs.argmax(0)[clear])
        assert np.array_equal(np.asarray(Image.open(evaluated / "predictions" / f"{stem}.png")).astype(np.int64), ids)
        assert (tmp_path / "out" / f"{stem}_overlay.jpg").is_file()
        seen |= set(np.unique(ids).tolist())
    assert max(seen) > 255  # ids beyond 8 bits were written as themselves (299 is not 43)
