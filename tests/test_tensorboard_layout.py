"""TensorBoard's first screen, as a user opens it: ``tensorboard --logdir <run dir>``,
``tensorboard --logdir outputs`` (training runs, evaluate runs and sweeps side by side), or a
sweep's folder. The Time Series page opens on the training and validation curves, and the HPARAMS
table shows the best val mIoU as its first score. Computed from the event files by TensorBoard's
own data provider and plugins (tests/tensorboard_view.py)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

from fcn.cli.evaluate import run_evaluation
from tests.conftest import compose_config
from tests.tensorboard_view import (
    OPEN_GROUPS,
    compare_tags,
    hparams_columns,
    hparams_sessions,
    time_series_groups,
)

CURVES = ["train", "val"]


def _open_groups(logdir: Path) -> list[str]:
    return [name for name, _ in time_series_groups(logdir)[:OPEN_GROUPS]]


def _cards(logdir: Path, group: str) -> list[str]:
    return dict(time_series_groups(logdir))[group]


@pytest.fixture(scope="module")
def outputs(trained_run, tmp_path_factory) -> Path:
    """An ``outputs/`` folder as the README's commands leave it: a training run and an evaluation
    of its best checkpoint."""
    root = tmp_path_factory.mktemp("outputs")
    shutil.copytree(trained_run, root / "train" / "2026-12-06_11-00-00")
    checkpoint = root / "train" / "2026-12-06_11-00-00" / "checkpoints" / "best.pt"
    cfg = compose_config("evaluate", [f"checkpoint={checkpoint}", "num_workers=0"])
    run_evaluation(cfg, root / "evaluate" / "2026-12-06_11-05-00", overrides=[])
    return root


def test_tensorboard_orders_tags_as_its_time_series_page_does():
    tags = ["weights/norm", "val_per_class/IoU/a", "val/mIoU", "val/loss", "val_best/mIoU", "train/loss", "z_eval/mIoU"]
    order = sorted(tags, key=functools.cmp_to_key(compare_tags))
    assert order == [
        "train/loss",
        "val/loss",
        "val/mIoU",
        "val_best/mIoU",
        "val_per_class/IoU/a",
        "weights/norm",
        "z_eval/mIoU",
    ]
    assert compare_tags("step2", "step10") < 0 and compare_tags("val/x", "val_x") < 0 and compare_tags("B", "a") < 0


def test_a_run_directory_opens_on_the_train_and_val_curves_with_loss_and_miou_early(trained_run):
    assert _open_groups(trained_run) == CURVES
    assert _cards(trained_run, "train") == ["train/loss", "train/lr"]
    val = _cards(trained_run, "val")
    # the scores of every validation and the sample predictions; loss and mIoU the first two cards
    assert val == [
        "val/loss",
        "val/mIoU",
        "val/mean_acc",
        "val/mean_dice",
        "val/pixel_acc",
        "val/samples",
        "val/weighted_IoU",
    ]
    # nothing but curves in them: every card of the open groups has a point per validation or step
    groups = [name for name, _ in time_series_groups(trained_run)]
    assert groups == ["train", "val", "val_best", "val_per_class", "weights"]
    assert {"val_per_class/confusion_matrix", "val_per_class/IoU/circle"} <= set(_cards(trained_run, "val_per_class"))
    # ... and the same when TensorBoard is pointed at the events folder itself
    assert _open_groups(trained_run / "tensorboard") == CURVES


def test_outputs_with_training_and_evaluate_runs_opens_on_the_curves(outputs):
    assert _open_groups(outputs) == CURVES
    groups = [name for name, _ in time_series_groups(outputs)]
    assert groups[-2:] == ["z_eval", "z_eval_per_class"]  # evaluate's one-point scores come last
    assert _cards(outputs, "z_eval") == [
        "z_eval/mIoU",
        "z_eval/mean_acc",
        "z_eval/mean_dice",
        "z_eval/pixel_acc",
        "z_eval/weighted_IoU",
        "z_eval/worst_images",
    ]
    assert "z_eval_per_class/confusion_matrix" in _cards(outputs, "z_eval_per_class")


def test_an_evaluate_run_alone_opens_on_its_scores(outputs):
    assert _open_groups(outputs / "evaluate") == ["z_eval", "z_eval_per_class"]


def test_the_hparams_table_shows_the_best_val_miou_as_its_first_score(trained_run, outputs):
    for logdir in (trained_run, outputs):
        settings, scores = hparams_columns(logdir)
        assert scores == ["val_best/mIoU", "val_best/pixel_acc"]
        assert settings == ["batch_size", "epochs", "lr", "model", "optimizer"]
    # one row per training run; evaluate runs hold none
    assert hparams_sessions(outputs) == ["train/2026-12-06_11-00-00/tensorboard/defaults"]


def test_the_best_scores_are_one_point_at_the_best_checkpoints_step(trained_run):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    best = json.loads((trained_run / "metrics.json").read_text())
    events = EventAccumulator(str(trained_run / "tensorboard" / "defaults"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("val_best/mIoU")] == [
        (best["step"], round(best["miou"], 6))
    ]
    assert set(events.Tags()["scalars"]) == {"val_best/mIoU", "val_best/pixel_acc"}


@pytest.mark.slow
def test_a_sweep_opens_on_the_curves_and_its_hparams_rows_differ_by_the_swept_key(shapes_root, tmp_path):
    from tests.test_cluster import _launcher_overrides, _train

    sweep = tmp_path / "outputs" / "multirun" / "2026-12-06_12-00-00"
    proc = _train(["-m", "optim.lr=0.01,0.02", f"hydra.sweep.dir={sweep}", *_launcher_overrides(shapes_root)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for logdir in (sweep, tmp_path / "outputs"):
        assert _open_groups(logdir) == CURVES
        settings, scores = hparams_columns(logdir)
        assert scores[0] == "val_best/mIoU"
        # what differs between the rows first: the swept key (as the run saw it, and as given)
        assert settings[:3] == ["lr", "optim.lr", "overrides"]
    rows = hparams_sessions(sweep)
    assert len(rows) == 2 and all("optim.lr=0.0" in row for row in rows)
