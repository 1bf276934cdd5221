"""Batches and settings that cannot train: caught up front or handled, never mistaken for divergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fcn.engine import Settings, evaluate, train_one_epoch
from fcn.losses import CrossEntropy, DiceLoss, TopKCrossEntropy, WeightedSum

IGNORE = 255

LOSSES = {
    "cross_entropy": lambda: CrossEntropy(ignore_index=IGNORE),
    "cross_entropy_class_weights": lambda: CrossEntropy(ignore_index=IGNORE, class_weights=[0.5, 2.0, 1.0]),
    "cross_entropy_label_smoothing": lambda: CrossEntropy(ignore_index=IGNORE, label_smoothing=0.1),
    "cross_entropy_weights_and_smoothing": lambda: CrossEntropy(
        ignore_index=IGNORE, class_weights=[0.5, 2.0, 1.0], label_smoothing=0.1
    ),
    "dice": lambda: DiceLoss(ignore_index=IGNORE),
    "ohem": lambda: TopKCrossEntropy(top_k=0.25, ignore_index=IGNORE),
    "ohem_class_weights": lambda: TopKCrossEntropy(ignore_index=IGNORE, class_weights=[0.5, 2.0, 1.0]),
    "ce_plus_dice": lambda: WeightedSum([CrossEntropy(ignore_index=IGNORE), DiceLoss(ignore_index=IGNORE)], [1, 0.5]),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_without_labelled_pixel_gives_zero_loss_and_zero_gradient(name):
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE, dtype=torch.long)
    loss = LOSSES[name]()(logits, target)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_with_labels_still_gives_a_positive_loss(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0] = IGNORE  # one image void, the other labelled
    assert LOSSES[name]()(logits, target).item() > 0


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


def _batches(void_first: bool):
    torch.manual_seed(0)
    images = torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8)
    labelled = torch.randint(0, 3, (1, 8, 8))
    void = torch.full((1, 8, 8), IGNORE, dtype=torch.long)
    return [(images, void), (images, labelled)] if void_first else [(images, labelled), (images, void)]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_training_step_on_void_batch_is_not_counted_as_non_finite(name):
    model = _Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    result = train_one_epoch(
        model,
        _batches(void_first=True),
        optimizer,
        scheduler,
        LOSSES[name](),
        Settings(device=torch.device("cpu"), mean=[0.5] * 3, std=[0.5] * 3, skip_nonfinite=0),
        step=0,
    )
    assert result.step == 2 and math.isfinite(result.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_val_loss_averages_over_batches_with_labels_only():
    model = _Tiny()
    loss_fn = CrossEntropy(ignore_index=IGNORE)
    settings = Settings(torch.device("cpu"), [0.5] * 3, [0.5] * 3, num_classes=3, ignore_index=IGNORE)
    common = dict(loss_fn=loss_fn, desc=None)
    with_void = evaluate(model, _batches(void_first=False), settings, **common)
    labelled_only = evaluate(model, _batches(void_first=False)[:1], settings, **common)
    assert math.isfinite(with_void.loss)
    assert with_void.loss == pytest.approx(labelled_only.loss)
    assert with_void.loss_batches == 1
    all_void = evaluate(model, _batches(void_first=False)[1:], settings, **common)
    assert math.isnan(all_void.loss) and all_void.loss_batches == 0


# ---- settings checked before any set-up: one line naming the key ----

BAD_TRAIN_SETTINGS = {
    "one_class": (["data.num_classes=1", "data.class_names=[fg]"], "data.num_classes=1"),
    "zero_classes": (["data.num_classes=0", "data.class_names=[]"], "data.num_classes=0"),
    "ignore_index_is_a_class": (["data.ignore_index=0"], "data.ignore_index=0"),
    "crop_zero": (["data.crop_size=0"], "data.crop_size"),
    "crop_negative_side": (["data.crop_size=[32,-8]"], "data.crop_size"),
    "batch_of_one_with_1x1_features": (["trainer.batch_size=1", "data.crop_size=32"], "trainer.batch_size=1"),
    "batch_size_zero": (["trainer.batch_size=0"], "trainer.batch_size"),
    "epochs_zero": (["trainer.epochs=0"], "trainer.epochs"),
    "val_every_zero": (["trainer.val_every=0"], "trainer.val_every"),
    "accumulate_zero": (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    "limit_train_zero": (["trainer.limit_train_batches=0"], "trainer.limit_train_batches"),
    "grad_clip_zero": (["trainer.grad_clip_norm=0"], "trainer.grad_clip_norm"),
    "grad_clip_negative": (["trainer.grad_clip_norm=-1"], "trainer.grad_clip_norm"),
    "decoder_lr_mult_zero": (["trainer.decoder_lr_mult=0"], "trainer.decoder_lr_mult"),
    "lr_negative": (["optim.lr=-1"], "optim.lr=-1"),
    "lr_nan": (["optim.lr=nan"], "optim.lr=nan"),
    "lr_inf": (["optim.lr=inf"], "optim.lr=inf"),
    "weight_decay_negative": (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    "momentum_above_one": (["optim=sgd", "optim.momentum=1.5"], "optim.momentum"),
    "momentum_negative": (["optim=sgd", "optim.momentum=-0.1"], "optim.momentum"),
    "beta_above_one": (["+optim.betas=[0.9,1.5]"], "optim.betas"),
    "warmup_negative": (["sched.warmup_steps=-1"], "sched.warmup_steps"),
    "warmup_factor_zero": (["sched.warmup_factor=0"], "sched.warmup_factor"),
    "label_smoothing_above_one": (["loss.label_smoothing=1.5"], "loss.label_smoothing"),
    "label_smoothing_negative": (["loss.label_smoothing=-0.1"], "loss.label_smoothing"),
    "ohem_keep_zero": (["loss=ohem", "loss.top_k=0"], "loss.top_k"),
    "ohem_keep_above_one": (["loss=ohem", "loss.top_k=1.5"], "loss.top_k"),
    "class_weights_too_few": (["loss.class_weights=[1,2]"], "loss.class_weights"),
    "class_weights_negative": (["loss.class_weights=[1,1,1,1,1,-1]"], "loss.class_weights"),
    "class_weights_all_zero": (["loss.class_weights=[0,0,0,0,0,0]"], "loss.class_weights"),
    "inner_class_weights_in_a_sum": (
        ["loss=ce_dice", "loss.losses.0.class_weights=[1]"],
        "loss.losses.0.class_weights",
    ),
    "sum_weight_negative": (["loss=ce_dice", "loss.weights=[1,-0.5]"], "loss.weights"),
    "window_zero": (["eval.window=[0,0]"], "eval.window"),
    "stride_larger_than_window": (["eval=sliding", "eval.stride=[600,600]"], "eval.stride"),
    "max_image_pixels_negative": (["data.max_image_pixels=-5"], "data.max_image_pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_SETTINGS))
def test_bad_setting_is_refused_before_set_up_naming_the_key(case, shapes_root, tmp_path):
    from fcn.errors import UserError
    from fcn.train import train
    from tests.conftest import compose_config, tiny_train_overrides

    overrides, key = BAD_TRAIN_SETTINGS[case]
    cfg = compose_config("train", [*tiny_train_overrides(shapes_root), *overrides])
    out = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        train(cfg, out)
    message = str(caught.value)
    assert key in message and "\n" not in message
    assert not out.exists()  # refused before the run directory, the scan or the model


def test_default_and_tiny_settings_pass_validation(shapes_root):
    from fcn.config import validate_eval_config, validate_train_config
    from tests.conftest import compose_config, tiny_train_overrides

    validate_train_config(compose_config("train", []))
    validate_train_config(compose_config("train", tiny_train_overrides(shapes_root)))
    validate_train_config(compose_config("train", ["optim=sgd", "loss=ce_dice", "eval=sliding", "model=vgg16_fcn8s"]))
    validate_eval_config(compose_config("predict", ["eval=sliding"]))


def test_predict_refuses_a_bad_window_before_reading_the_checkpoint(tmp_path):
    from fcn.cli.predict import run_prediction
    from fcn.errors import UserError
    from tests.conftest import compose_config

    cfg = compose_config("predict", [f"checkpoint={tmp_path / 'missing.pt'}", f"input={tmp_path}", "eval.window=[0,8]"])
    with pytest.raises(UserError, match="eval.window"):
        run_prediction(cfg, ["eval.window=[0,8]"])


def test_warm_up_longer_than_the_run_is_warned_with_both_numbers():
    from fcn.config import warmup_warning

    assert warmup_warning(50, 6) is not None and "50" in warmup_warning(50, 6) and "6" in warmup_warning(50, 6)
    assert warmup_warning(50, 600) is None and warmup_warning(0, 1) is None


def test_reduce_zero_label_is_never_suggested_when_it_would_leave_one_class():
    from fcn.data.doctor.diagnose import _value_fix

    assert "reduce_zero_label" not in _value_fix([1], {0, 1}, num_classes=1, ignore_index=255, mapped=False)
    assert "reduce_zero_label" not in _value_fix([1], {1}, num_classes=1, ignore_index=255, mapped=False)
    assert "num_classes=1" not in _value_fix([0], {0}, num_classes=0, ignore_index=255, mapped=False)
    assert "reduce_zero_label" in _value_fix([3], {0, 1, 2, 3}, num_classes=3, ignore_index=255, mapped=False)


def test_crop_larger_than_every_image_is_warned_with_padding_and_cost():
    from fcn.config import crop_padding_warning

    message = crop_padding_warning((512, 512), {"128x128": 10})
    assert message is not None and "94%" in message and "16.0x" in message and "128x128" in message
    assert crop_padding_warning((128, 128), {"128x128": 10, "64x64": 3}) is None  # some image fills it
    assert crop_padding_warning((512, 512), {}) is None


def test_training_warns_when_the_crop_exceeds_every_image(shapes_root, tmp_path, caplog):
    import logging

    from fcn.train import train
    from tests.conftest import compose_config, tiny_train_overrides

    short = ["trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "logger=none"]
    cfg = compose_config("train", [*tiny_train_overrides(shapes_root), "data.crop_size=96", *short])
    with caplog.at_level(logging.WARNING):
        train(cfg, tmp_path / "run")
    assert "data.crop_size=[96, 96] is larger than every training image (largest 48x48): 75%" in caplog.text


def test_scan_warns_about_masks_that_are_entirely_ignored(tmp_path):
    import numpy as np
    from PIL import Image

    from fcn.data.doctor.scan import scan_split
    from fcn.data.labels import MaskDecoder

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name, value in (("void", IGNORE), ("labelled", 1)):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    layout = {"image_dir": "images", "mask_dir": "masks", "split_file": None, "mask_suffix": ".png"}
    report = scan_split(tmp_path, "train", layout, MaskDecoder(2, IGNORE), cache=False)
    [problem] = [p for p in report.warnings if p.kind == "no_labelled_pixel"]
    assert problem.count == 1 and problem.files[0].endswith("void.png")


def test_data_doctor_refuses_a_single_class():
    from fcn.config import check_classes
    from fcn.errors import UserError
    from tests.conftest import compose_config

    cfg = compose_config("check_data", ["data.num_classes=1", "data.class_names=[fg]"])
    with pytest.raises(UserError, match="data.num_classes=1: segmentation needs at least 2 classes"):
        check_classes(cfg.data.num_classes, list(cfg.data.class_names), cfg.data.palette, cfg.data.ignore_index)


def test_learning_rate_zero_is_allowed_with_a_warning(caplog):
    import logging

    from fcn.config import check_optimizer

    with caplog.at_level(logging.WARNING):
        check_optimizer({"lr": 0.0}, "optim")
    assert "optim.lr=0: the weights will not change" in caplog.text


@pytest.mark.slow
def test_negative_learning_rate_ends_in_one_line_and_exit_code_2(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, str(repo / "scripts" / "train.py"), "optim.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "optim.lr=-1" in errors[0] and "Traceback" not in proc.stderr
