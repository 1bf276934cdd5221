"""The epoch loop: train an epoch, validate, keep the best and the last checkpoint, stop early or
on a signal. :func:`fit` reads top to bottom; everything it needs comes in as plain arguments.

Inside a process group (one process of a ``torchrun`` job, see :mod:`fcn.distributed`) every rank
runs :func:`fit` with the same arguments: the model trains in DistributedDataParallel on this
rank's share of each batch, validation is split between the ranks and summed, and only rank 0
writes files.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fcn import distributed
from fcn.checkpoint import save_checkpoint
from fcn.data.loader import pad_collate
from fcn.data.sampler import ResumableSampler
from fcn.engine import combine_ranks, evaluate, to_model_input, train_one_epoch
from fcn.errors import UserError
from fcn.loggers import NullLogger
from fcn.metrics import scores
from fcn.progress import RunClock, epoch_description, format_duration, validations_left
from fcn.rng import capture_rng_state
from fcn.signals import GracefulStop, TrainingInterrupted
from fcn.summary import decoder_drift, decoder_kernels
from fcn.throughput import ThroughputWatch
from fcn.visualize import comparison_grid, confusion_image

log = logging.getLogger(__name__)

# The validation scores kept for the best checkpoint (and reported at the end).
METRIC_KEYS = ("miou", "pixel_acc", "mean_acc", "fwiou", "per_class_iou")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (as its ``progress``) and resumed from.

    ``epoch`` is the epoch in progress, ``epoch_batches`` the batches of it done (per process),
    ``step`` the global optimisation step, ``best`` the best validation so far (its
    :data:`METRIC_KEYS`, epoch, step and checkpoint path), ``stale`` the validations since it.
    """

    epoch: int = 1
    epoch_batches: int = 0
    step: int = 0
    best: dict | None = None
    stale: int = 0

    @classmethod
    def from_progress(cls, progress: dict) -> TrainState:
        """The state saved as a checkpoint's ``progress`` (which also holds the run's shape)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in progress.items() if k in names})


@dataclass(frozen=True)
class RunShape:
    """What must stay the same for a run to resume exactly (see :func:`fcn.resume.check_same_run_shape`)."""

    batch_size: int
    batches_per_epoch: int  # per process, a multiple of accumulate_grad_batches
    total_steps: int  # the schedule's length
    world_size: int
    accumulate_grad_batches: int

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.accumulate_grad_batches


def plan_epochs(
    images_per_rank: int,
    *,
    batch_size: int,
    drop_last: bool,
    accumulate: int,
    epochs: int,
    limit_train_batches: int | None,
    world_size: int,
) -> RunShape:
    """How many batches and optimisation steps an epoch has, per process.

    One optimisation step per ``accumulate`` batches; the schedule counts steps. Batches that
    cannot fill a last step of the epoch are not drawn (as ``drop_last`` does for images).
    Raises :class:`UserError` when an epoch cannot fill one step.
    """
    batches = images_per_rank // batch_size if drop_last else 1
    if limit_train_batches is not None:
        batches = min(batches, limit_train_batches)
    steps = batches // accumulate
    if steps < 1:
        raise UserError(
            f"trainer.accumulate_grad_batches={accumulate} but an epoch has only {batches} batches "
            f"per process: lower it or trainer.batch_size"
        )
    return RunShape(
        batch_size=batch_size,
        batches_per_epoch=steps * accumulate,
        total_steps=epochs * steps,
        world_size=world_size,
        accumulate_grad_batches=accumulate,
    )


@dataclass(frozen=True)
class FitSettings:
    """How to train (the ``trainer`` settings the loop uses), in plain values."""

    epochs: int
    val_every: int = 1  # validate every N epochs, and always after the last
    checkpoint_every_n_steps: int | None = None  # also save last.pt mid-epoch
    early_stopping_patience: int | None = None  # validations without a better val mIoU
    skip_nonfinite: int = 0
    grad_clip_norm: float | None = None
    limit_val_batches: int | None = None
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class DataInfo:
    """What the loop needs to know about the data: normalisation and class names, for scores and pictures."""

    num_classes: int
    ignore_index: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    palette: list[list[int]]


class Checkpointer:
    """Writes ``best.pt`` and ``last.pt``: the training state plus ``run_info`` (config, classes...).

    Called by every rank at the same points: each rank's random state goes in (each resumes its
    own dropout masks), the rest is rank 0's, and only rank 0 writes.
    """

    def __init__(self, ckpt_dir: Path, model, optimizer, scheduler, scaler, shape: RunShape, run_info: dict) -> None:
        self.dir, self.run_info, self.shape = ckpt_dir, run_info, shape
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def save(self, path: Path, state: TrainState, metrics: dict | None = None) -> None:
        rng = distributed.gather_objects(capture_rng_state())
        if not distributed.is_main():
            return
        progress = {**dataclasses.asdict(state), **dataclasses.asdict(self.shape)}
        checkpoint = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng[0],
            "rng_by_rank": rng if self.shape.world_size > 1 else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": progress,
            "epoch": state.epoch,
            "step": state.step,
            "metrics": metrics,
            **self.run_info,
        }
        save_checkpoint(checkpoint, path, keep_previous=path.name == "last.pt")


def fit(
    model: torch.nn.Module,
    train_net: torch.nn.Module,
    eval_net: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: torch.nn.Module,
    checkpointer: Checkpointer,
    *,
    state: TrainState,
    settings: FitSettings,
    data: DataInfo,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    infer: Callable | None = None,
    logger: NullLogger | None = None,
    stop: GracefulStop | None = None,
) -> TrainState:
    """Train from ``state`` to the last epoch (or an early stop); returns the final state.

    ``model`` is the plain network (saved, scored by the logger), ``train_net`` what trains (maybe
    compiled and wrapped in DistributedDataParallel), ``eval_net`` what validates (maybe
    compiled). ``train_loader`` draws its order from a :class:`ResumableSampler` (a resumed
    epoch continues where it stopped); ``val_loader``'s dataset gives the logger's sample pictures.
    ``stop`` is polled after every step.

    Raises :class:`TrainingInterrupted` after saving ``last.pt`` when stopped by a signal, and
    lets :class:`fcn.engine.NonFiniteLossError` and out-of-memory errors through.
    """
    logger = logger or NullLogger()
    shape = checkpointer.shape
    accumulate = shape.accumulate_grad_batches
    # A signal seen by any rank stops all of them after the same step.
    shared_stop = distributed.SharedStop(stop or GracefulStop())
    sampler: ResumableSampler = train_loader.sampler
    val_set = val_loader.dataset
    sample_indices = np.linspace(0, len(val_set) - 1, min(logger.num_images, len(val_set))).round().astype(int)
    if state.epoch_batches >= shape.batches_per_epoch:  # the checkpoint closed its epoch
        state = dataclasses.replace(state, epoch=state.epoch + 1, epoch_batches=0)
    clock = RunClock(shape.total_steps, state.step)  # the bar's whole-run ETA
    # Warns, with the fix, when a stretch of training runs at under half this run's best speed
    # (rank 0 only: every rank would say the same).
    watch = ThroughputWatch(torch.get_num_threads(), device.type) if distributed.is_main() else None

    while state.epoch <= settings.epochs:
        epoch = state.epoch
        # Train (the rest of) one epoch; a resumed epoch continues at the batch it stopped at.
        sampler.set_epoch(epoch, start=state.epoch_batches * shape.batch_size)
        on_step = _StepHook(logger, checkpointer, state, settings.checkpoint_every_n_steps, accumulate, watch)
        to_validate = validations_left(epoch, settings.epochs, settings.val_every)

        def run_eta(step: int, to_validate: int = to_validate) -> dict:
            seconds = clock.eta(step, to_validate)
            return {} if seconds is None else {"run_eta": format_duration(seconds)}

        clock.start_epoch()
        if watch is not None:
            watch.resume()  # the time since the last epoch's end (validation, saving) is not training
        result = train_one_epoch(
            train_net,
            train_loader,
            optimizer,
            scheduler,
            loss_fn,
            device=device,
            mean=data.mean,
            std=data.std,
            step=state.step,
            epoch=epoch,
            max_steps=(shape.batches_per_epoch - state.epoch_batches) // accumulate,
            accumulate=accumulate,
            channels_last=settings.channels_last,
            skip_nonfinite=settings.skip_nonfinite,
            amp_dtype=settings.amp_dtype,
            scaler=scaler,
            grad_clip_norm=settings.grad_clip_norm,
            grad_norm_every=logger.log_every_n_steps,
            should_stop=shared_stop.poll,
            on_step=on_step,
            progress=distributed.is_main(),
            desc=epoch_description(epoch, settings.epochs),
            postfix=run_eta,
        )
        clock.end_epoch()
        if watch is not None:
            watch.pause()
        state = dataclasses.replace(state, step=result.step, epoch_batches=state.epoch_batches + result.batches)
        if state.epoch_batches < shape.batches_per_epoch:  # stopped mid-epoch by a signal
            checkpointer.save(checkpointer.last, state)
            distributed.barrier()  # no rank exits before rank 0 has saved
            raise TrainingInterrupted(shared_stop.requested or 0, checkpointer.last)

        # Validate every val_every epochs and after the last; the best val mIoU is kept as best.pt.
        metrics = None
        if epoch % settings.val_every == 0 or epoch == settings.epochs:
            started = clock.now()
            metrics, confusion = _validate(model, eval_net, val_loader, loss_fn, data, settings, device, infer)
            clock.add_validation(clock.now() - started)
            log.info(  # scores in percent, as the tables print them
                "epoch %d/%d: train loss %.4f, val loss %.4f, val mIoU %.2f%%, pixel acc %.2f%%",
                epoch,
                settings.epochs,
                result.loss,
                metrics["val_loss"],
                100 * metrics["miou"],
                100 * metrics["pixel_acc"],
            )
            _log_validation(logger, state.step, metrics, confusion, data.class_names, model)
            if len(sample_indices):
                grid = _sample_grid(eval_net, val_set, sample_indices, data, device, settings)
                logger.log_image("val/samples", grid, state.step)
            if state.best is None or metrics["miou"] > state.best["miou"]:
                best = {k: metrics[k] for k in METRIC_KEYS} | {
                    "epoch": epoch,
                    "step": state.step,
                    "checkpoint": str(checkpointer.best),
                }
                state = dataclasses.replace(state, best=best, stale=0)
                checkpointer.save(checkpointer.best, state, metrics)
            else:
                state = dataclasses.replace(state, stale=state.stale + 1)
        else:
            log.info("epoch %d/%d: train loss %.4f", epoch, settings.epochs, result.loss)
        checkpointer.save(checkpointer.last, state, metrics)

        # Stop: on a signal (also one during validation), or when val mIoU has stopped improving.
        if shared_stop.poll(state.step) and epoch < settings.epochs:
            distributed.barrier()
            raise TrainingInterrupted(shared_stop.requested, checkpointer.last)
        patience = settings.early_stopping_patience
        if patience and state.stale >= patience:
            log.info("early stopping: val mIoU has not improved for %d validations", patience)
            break
        state = dataclasses.replace(state, epoch=epoch + 1, epoch_batches=0)
    return state


# TensorBoard's Custom Scalars tab: the curves a user looks at first, side by side. (On the Time
# Series page tag groups sort by name and the first two open expanded: ``train`` and ``val``; the
# diagnostics are in ``val_class_IoU`` and ``weights``, which sort after them.)
OVERVIEW_LAYOUT = {
    "overview": {
        "loss (train, val)": ["Multiline", ["train/loss", "val/loss"]],
        "val mIoU": ["Multiline", ["val/mIoU"]],
        "val pixel accuracy": ["Multiline", ["val/pixel_acc"]],
        "learning rate": ["Multiline", ["train/lr"]],
    }
}


def log_run_start(logger, summary: dict, config_yaml: str) -> None:
    """What a new run logs once: the overview layout, the model summary and the resolved config
    (TensorBoard's Text tab, as a YAML code block)."""
    logger.log_layout(OVERVIEW_LAYOUT)
    logger.log_text("model/summary", "  \n".join(f"{k}: {v}" for k, v in summary.items()), 0)
    logger.log_text("config", f"```yaml\n{config_yaml}```", 0)


class _StepHook:
    """Called by :func:`fcn.engine.train_one_epoch` after each step: logs the step's numbers,
    saves ``last.pt`` every ``checkpoint_every`` steps (epoch ends are saved after validation) and
    feeds the ``watch`` that warns when training slows down."""

    def __init__(
        self, logger, checkpointer: Checkpointer, epoch_start: TrainState, checkpoint_every, accumulate, watch=None
    ):
        self.logger, self.checkpointer, self.epoch_start = logger, checkpointer, epoch_start
        self.checkpoint_every, self.accumulate, self.watch = checkpoint_every, accumulate, watch

    def __call__(self, step: int, loss: float, lr: float, grad_norm: float | None) -> None:
        if self.watch is not None and (slow := self.watch.step(self.checkpointer.shape.batch_size * self.accumulate)):
            log.warning("%s", slow)
        every_log = self.logger.log_every_n_steps
        if every_log and step % every_log == 0:
            self.logger.log_scalar("train/loss", loss, step)
            self.logger.log_scalar("train/lr", lr, step)
            if grad_norm is not None:
                self.logger.log_scalar("weights/grad_norm", grad_norm, step)
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            start = self.epoch_start
            done = start.epoch_batches + (step - start.step) * self.accumulate
            if done < self.checkpointer.shape.batches_per_epoch:
                now = dataclasses.replace(start, epoch_batches=done, step=step)
                if self.watch is not None:
                    self.watch.pause()  # saving is not training
                self.checkpointer.save(self.checkpointer.last, now)
                if self.watch is not None:
                    self.watch.resume()


def _validate(model, eval_net, val_loader, loss_fn, data: DataInfo, settings: FitSettings, device, infer):
    """Score ``eval_net`` on this rank's share of the validation set, summed over the ranks."""
    distributed.broadcast_buffers(model)  # every rank scores the model rank 0 saves
    evaluation = evaluate(
        eval_net,
        val_loader,
        num_classes=data.num_classes,
        ignore_index=data.ignore_index,
        device=device,
        mean=data.mean,
        std=data.std,
        loss_fn=loss_fn,
        max_batches=settings.limit_val_batches,
        channels_last=settings.channels_last,
        amp_dtype=settings.amp_dtype,
        infer=infer,
        desc="val",
        progress=distributed.is_main(),
    )
    evaluation = combine_ranks(evaluation)  # exact: integer confusion counts summed over ranks
    metrics = scores(evaluation.confusion, data.class_names)
    metrics["val_loss"] = evaluation.loss
    return metrics, evaluation.confusion


def _log_validation(logger, step: int, metrics: dict, confusion: torch.Tensor, class_names, model) -> None:
    if not logger.enabled:
        return  # nobody looks: skip drawing the confusion picture and kernels
    logger.log_scalar("val/loss", metrics["val_loss"], step)
    logger.log_scalar("val/mIoU", metrics["miou"], step)
    logger.log_scalar("val/pixel_acc", metrics["pixel_acc"], step)
    logger.log_scalar("val/mean_acc", metrics["mean_acc"], step)
    logger.log_scalar("val/fwIoU", metrics["fwiou"], step)
    for name, iou in metrics["per_class_iou"].items():
        if iou is not None:
            logger.log_scalar(f"val_class_IoU/{name}", iou, step)
    logger.log_image("val/confusion_matrix", np.asarray(confusion_image(confusion, class_names).convert("RGB")), step)
    # How far each learned upsampling has moved from bilinear interpolation, and what it became.
    for name, drift in decoder_drift(model).items():
        logger.log_scalar(f"weights/decoder_drift/{name}", drift, step)
    for name, kernel in decoder_kernels(model).items():
        logger.log_image(f"weights/decoder_kernel/{name}", kernel, step)
    weight_norm = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
    logger.log_scalar("weights/norm", weight_norm, step)


@torch.no_grad()
def _sample_grid(net, dataset, indices, data: DataInfo, device, settings: FitSettings) -> torch.Tensor:
    """The same few validation images at every validation: input, ground truth, prediction."""
    images, masks = pad_collate([dataset[int(i)] for i in indices], data.ignore_index)
    net.eval()
    x = to_model_input(images, device, data.mean, data.std, settings.channels_last)
    with torch.autocast(device.type, dtype=settings.amp_dtype, enabled=settings.amp_dtype is not None):
        preds = net(x).argmax(1)
    return comparison_grid(images, masks, preds, data.palette, data.ignore_index)
