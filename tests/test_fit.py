"""The pieces of the epoch loop and its neighbours, through ``fcn.*``: the run's shape, the training
state saved in checkpoints, the loggers, and rebuilding a checkpoint's model without Hydra."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fcn.checkpoint import load_model, save_checkpoint
from fcn.errors import UserError
from fcn.loggers import NullLogger, TensorBoardLogger
from fcn.models import FCN
from fcn.resume import TrainState, plan_epochs


def _plan(images: int, batch: int, accumulate: int = 1, limit: int | None = None):
    return plan_epochs(
        images,
        batch_size=batch,
        drop_last=images > batch,
        accumulate=accumulate,
        epochs=3,
        limit_train_batches=limit,
        world_size=1,
    )


def test_an_epoch_draws_only_the_batches_that_fill_whole_optimisation_steps():
    shape = _plan(images=20, batch=2, accumulate=3)  # 10 batches: 3 steps of 3, the 10th not drawn
    assert (shape.batches_per_epoch, shape.steps_per_epoch, shape.total_steps) == (9, 3, 9)
    assert _plan(images=20, batch=2, limit=4).batches_per_epoch == 4
    assert _plan(images=3, batch=8).batches_per_epoch == 1  # one short batch rather than none


def test_accumulating_more_batches_than_an_epoch_has_names_the_settings():
    with pytest.raises(UserError, match=r"trainer.accumulate_grad_batches=4 .* only 3 batches"):
        _plan(images=6, batch=2, accumulate=4)


def test_training_state_round_trips_through_a_checkpoints_progress():
    state = TrainState(epoch=3, epoch_batches=2, step=17, best={"miou": 0.5}, stale=1)
    progress = {**dataclasses.asdict(state), **dataclasses.asdict(_plan(images=20, batch=2))}
    assert TrainState.from_progress(progress) == state
    older = {k: v for k, v in progress.items() if k != "stale"}  # checkpoints from before early stopping
    assert TrainState.from_progress(older).stale == 0


def test_the_null_logger_accepts_other_loggers_settings_and_asks_for_nothing():
    logger = NullLogger(log_every_n_steps=1, num_images=4)
    assert not logger.enabled and logger.log_every_n_steps == 0 and logger.num_images == 0
    logger.log_scalar("train/loss", 1.0, 1)  # no file, no error


def test_tensorboard_logger_refuses_a_logging_interval_below_one():
    with pytest.raises(UserError, match=r"logger.log_every_n_steps=0: must be at least 1"):
        TensorBoardLogger(log_every_n_steps=0)


def test_tensorboard_logger_writes_events_into_the_run_directory(tmp_path):
    logger = TensorBoardLogger(log_every_n_steps=1, num_images=0)
    logger.open(tmp_path)
    logger.log_scalar("train/loss", 0.5, 1)
    logger.close()
    logger.close()  # twice is fine
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_load_model_rebuilds_the_trained_network_without_hydra(tmp_path):
    config = {
        "_target_": "fcn.models.FCN",
        "num_classes": 3,
        "backbone": "tiny",
        "variant": "16s",
        "width": 4,
        "pretrained": True,
        "sync_bn": False,
    }  # sync_bn: older checkpoints kept it with the model
    torch.manual_seed(0)
    trained = FCN(num_classes=3, backbone="tiny", variant="16s", width=4).eval()
    save_checkpoint({"model": trained.state_dict(), "config": {"model": config}}, tmp_path / "best.pt")
    model, ckpt = load_model(tmp_path / "best.pt")
    x = torch.rand(1, 3, 37, 45)
    assert not model.training and ckpt["config"]["model"] == config
    assert torch.equal(model(x), trained(x))


def test_load_model_says_when_the_weights_do_not_fit_the_saved_settings(tmp_path):
    config = {"num_classes": 3, "backbone": "tiny", "variant": "8s", "width": 4}
    other = FCN(num_classes=5, backbone="tiny", variant="8s", width=4)
    save_checkpoint({"model": other.state_dict(), "config": {"model": config}}, tmp_path / "x.pt")
    with pytest.raises(
        UserError,
        match=r"x\.pt: cannot be loaded into this FCN: .*score_out\.weight.*do not match its own model config",
    ):
        load_model(tmp_path / "x.pt")


def test_the_progress_bar_says_which_epoch_of_how_many():
    from fcn.progress import epoch_description

    assert epoch_description(3, 12) == "epoch 3/12"


def test_the_run_eta_counts_the_steps_and_the_validations_left():
    from fcn.progress import RunClock, format_duration, validations_left

    now = [0.0]
    clock = RunClock(total_steps=10, start_step=0, now=lambda: now[0])
    clock.start_epoch()
    assert clock.eta(0, validations_to_do=2) is None  # nothing timed yet
    now[0] = 4.0
    assert clock.eta(2, validations_to_do=2) == pytest.approx(8 * 2.0)  # 2 s a step, validation unknown yet
    clock.end_epoch()
    clock.add_validation(5.0)
    clock.start_epoch()
    now[0] = 6.0
    assert clock.eta(3, validations_to_do=1) == pytest.approx(7 * 2.0 + 5.0)
    assert validations_left(3, 12, val_every=5) == 3  # epochs 5 and 10, and the last (12)
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"


def test_tensorboard_hparams_are_a_run_named_by_the_overrides_with_the_settings_of_every_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(log_every_n_steps=1, num_images=0)
    logger.open(tmp_path)
    logger.log_hparams({"model": "tiny-fcn8s", "lr": 0.01}, {"val_best/mIoU": 0.5}, run_name="optim.lr=0.01", step=7)
    logger.close()
    run = tmp_path / "tensorboard" / "optim.lr=0.01"
    events = EventAccumulator(str(run))
    events.Reload()
    hparams_tags = set(events.PluginTagToContent("hparams"))
    # a session of its own, and no "experiment" record (TensorBoard would take one run's as everyone's)
    assert hparams_tags == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    assert [(e.step, e.value) for e in events.Scalars("val_best/mIoU")] == [(7, 0.5)]
