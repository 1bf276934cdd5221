"""The training run as plain data and plain functions: the checked config, the built parts, resume, fit, report.

:func:`train` is the one function that reads the whole config (as lightning-hydra-template's
``train(cfg)``) and reads as the story of a run. :func:`build_run` turns the config into a
:class:`Run`, a frozen record of the built parts (model, optimiser, schedule, loss, EMA, loaders,
the run's shape, logger, paths); everything after it takes that record and plain values:
:func:`fcn.resume.resume_training` continues an earlier run, :func:`fit` runs the epoch loop
(:func:`run_epoch`, :func:`after_step`, :func:`validate`, :func:`keep_best`, :func:`save`), and
:func:`report` writes ``metrics.json`` and prints the best checkpoint's scores. The data set-up
goes through :mod:`fcn.data.build`, the model, optimiser, schedule and loss through Hydra's
``instantiate``. ``fcn/cli/train.py`` wraps it in the process plumbing (Hydra, torchrun, SLURM,
signals).

Inside a process group (one process of a ``torchrun`` job, see :mod:`fcn.distributed`) every rank
runs :func:`train` with the same config: the model trains in DistributedDataParallel on this
rank's share of each batch, validation is split between the ranks and summed, only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from fcn import distributed
from fcn.atomic import atomic_path
from fcn.checkpoint import save_checkpoint
from fcn.config import crop_padding_warning, validate_train_config, warmup_warning
from fcn.data import build
from fcn.data.doctor.crop import folder_crop_warning
from fcn.data.loader import short_batch_warnings
from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
from fcn.device import (
    device_name,
    maybe_compile,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
    set_deterministic,
)
from fcn.engine import Bar, NonFiniteLossError, Settings, combine_ranks, evaluate, to_model_input, train_one_epoch
from fcn.errors import UserError, cause
from fcn.inference import inference_fn
from fcn.loggers import NullLogger
from fcn.metrics import format_table, scores
from fcn.optim import build_optimizer
from fcn.progress import RunClock, epoch_description, format_duration, validations_left
from fcn.report import to_json
from fcn.resume import METRIC_KEYS, RunShape, TrainState, init_weights, plan_epochs, resume_training
from fcn.rng import capture_rng_state, seed_everything
from fcn.run_logging import (
    best_scores,
    command_overrides,
    log_config_changes,
    log_run_start,
    log_validation,
    override_hparams,
    run_name,
    sample_grid,
)
from fcn.rundir import refuse_fresh_start
from fcn.signals import GracefulStop, TrainingInterrupted
from fcn.summary import model_summary
from fcn.visualize import default_palette

log = logging.getLogger(__name__)


def train(
    cfg: DictConfig,
    out_dir: str | Path,
    stop: GracefulStop | None = None,
    on_validation: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train as ``cfg`` says, writing checkpoints, logs and ``metrics.json`` to ``out_dir``.

    ``stop`` is polled after every step (the entry point passes one wired to SIGTERM/SIGINT).
    ``on_validation(epoch, metrics)`` is called after every validation, on every rank, once that
    epoch's checkpoints are written (``metrics`` holds ``miou``, ``pixel_acc``, ... and
    ``val_loss``); whatever it raises propagates unchanged (a search prunes a trial that way).
    Returns the best checkpoint's validation metrics; raises :class:`TrainingInterrupted` when
    stopped early, :class:`UserError` for a mistake (bad value, bad data, out of memory, a
    diverged loss). Inside a ``torchrun`` job every rank calls this with the same ``cfg`` and
    ``out_dir`` (``trainer.batch_size`` images per process); only rank 0 writes files.
    """
    validate_train_config(cfg)  # every value checked before any set-up (one line naming the key)
    started = (time.time(), _cpu_seconds())
    run = build_run(cfg, Path(out_dir))
    resumed = resume_run(run, cfg.resume)  # None: a fresh run
    try:
        state = fit(run, resumed or TrainState(), stop, on_validation, resumed=resumed is not None)
    except TrainingInterrupted as stopped:
        if getattr(stopped, "best", None) is not None:  # a stopped run reports what it has, as a finished one
            finish(run, cfg, stopped.best, started, status=f"stopped by signal {stopped.signum}")
        raise
    return finish(run, cfg, state.best, started, status="finished")


@dataclass(frozen=True)
class Loop:
    """When the epoch loop validates, saves and stops (``trainer.*``; None: never)."""

    epochs: int
    val_every: int = 1
    checkpoint_every: int | None = None  # save last.pt every N steps within an epoch
    patience: int | None = None  # stop after N validations without a better val mIoU
    limit_val_batches: int | None = None


@dataclass(frozen=True)
class Run:
    """The built parts of one training run, read by every function after :func:`build_run`.

    ``model`` holds the weights being trained, ``net`` the same model compiled when asked (the
    loop wraps it in DistributedDataParallel after the resume), ``ema`` their moving average or
    None. ``info`` is what every checkpoint carries besides the training state (the resolved
    config, class names, palette, ...), so evaluation never asks twice. ``oom_message`` names the
    settings to lower when memory runs out.
    """

    out_dir: Path
    info: dict
    model: torch.nn.Module
    net: torch.nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    settings: Settings
    train_loader: DataLoader
    val_loader: DataLoader
    shape: RunShape
    loop: Loop
    logger: object
    infer: Callable
    summary: dict
    sample_indices: np.ndarray
    oom_message: str

    @property
    def config(self) -> dict:
        return self.info["config"]

    @property
    def eval_net(self) -> torch.nn.Module:
        """What validates and what ``best.pt`` holds: the moving average when there is one."""
        return self.net if self.ema is None else self.ema.module

    @property
    def last_pt(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    @property
    def best_pt(self) -> Path:
        return self.out_dir / "checkpoints" / "best.pt"


def build_run(cfg: DictConfig, out_dir: Path) -> Run:
    """Everything a run needs, built from the checked ``cfg`` in the order that keeps it reproducible.

    The run directory is made (a fresh run refuses one holding checkpoints), the process seeded,
    the model built first (missing pretrained weights or a bad ``init_from`` end the run before a
    data scan), then the data, the optimiser, schedule, loss and EMA. Raises :class:`UserError`.
    """
    set_max_image_pixels(cfg.data.get("max_image_pixels", PILLOW_DEFAULT))  # before any image is opened
    data, trainer, main_rank = cfg.data, cfg.trainer, distributed.is_main()
    if main_rank and not cfg.resume:  # a fresh run never overwrites a checkpoint
        refuse_fresh_start(out_dir)
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", out_dir.resolve())
    if main_rank:
        log_config_changes(cfg)  # the overrides and what they changed; the path of the full config
    # A setting left without a value (data.num_classes: ???) is named here, before any file is read.
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    # Every rank checks the logger's settings (so all stop alike); only rank 0 logs.
    logger = instantiate(cfg.logger)
    logger = logger if main_rank else NullLogger()
    seed_everything(cfg.seed)
    set_deterministic(trainer.deterministic)
    device = distributed.device_for_rank(resolve_device(trainer.device, trainer.threads))
    channels_last = resolve_channels_last(trainer.channels_last, cfg.model.backbone, device)
    config["trainer"]["channels_last"] = channels_last  # checkpoints store what ran, not "auto"
    crop = build.pair(data.crop_size)
    model = build_model(cfg.model, device, channels_last)
    if cfg.init_from:
        init_weights(model, Path(cfg.init_from), config["model"])
    train_loader, val_loader, reports = build_data(cfg, crop)
    shape = plan_epochs(
        train_loader.sampler.per_rank,
        batch_size=trainer.batch_size,
        drop_last=train_loader.drop_last,
        accumulate=trainer.accumulate_grad_batches,
        epochs=trainer.epochs,
        limit_train_batches=trainer.limit_train_batches,
        world_size=distributed.world_size(),
    )
    summary = model_summary(model, crop, device)
    _log_shape_and_model(cfg, shape, summary, device)
    if trainer.sync_bn:
        model = distributed.sync_batch_norm(model, device)  # same parameters, so before or after init_from alike
    amp_dtype = resolve_precision(trainer.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    net = maybe_compile(model, trainer.compile, trainer.batch_size, crop, channels_last)
    optimizer = build_optimizer(instantiate(cfg.optim), model, trainer.decoder_lr_mult)
    settings = Settings(  # how every batch is fed, trained and scored
        device,
        tuple(data.mean),
        tuple(data.std),
        num_classes=data.num_classes,
        ignore_index=data.ignore_index,
        channels_last=channels_last,
        amp_dtype=amp_dtype,
        scaler=scaler,
        accumulate=trainer.accumulate_grad_batches,
        grad_clip_norm=trainer.get("grad_clip_norm"),
        skip_nonfinite=trainer.get("skip_nonfinite", 0),
        grad_norm_every=logger.log_every_n_steps,
    )
    scheduler = instantiate(cfg.sched)(optimizer, total_steps=shape.total_steps)
    if (too_long := warmup_warning(cfg.sched.get("warmup_steps"), shape.total_steps)) and main_rank:
        log.warning("%s", too_long)
    loss_fn = build.build_loss(cfg.loss, data, reports.get(data.train_split))
    # An exponential moving average of the weights (and batch-norm statistics), when asked: it is what
    # validates and what best.pt holds; last.pt also keeps the trained weights, to resume from.
    ema_decay = trainer.get("ema_decay")  # in (0, 1) or null: fcn/config.py
    ema = (
        None
        if ema_decay is None
        else AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    )
    infer = inference_fn(cfg.eval, data.num_classes)
    if distributed.world_size() > 1:  # the model is built (alike everywhere): now each rank draws its own dropout masks
        seed_everything(cfg.seed + distributed.rank())
    num_val = len(val_loader.dataset)
    return Run(
        out_dir=out_dir,
        info=_checkpoint_info(config, data),
        model=model,
        net=net,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        settings=settings,
        train_loader=train_loader,
        val_loader=val_loader,
        shape=shape,
        loop=Loop(
            epochs=trainer.epochs,
            val_every=trainer.get("val_every", 1),
            checkpoint_every=trainer.get("checkpoint_every_n_steps"),
            patience=trainer.get("early_stopping_patience"),
            limit_val_batches=trainer.get("limit_val_batches"),
        ),
        logger=logger,
        infer=infer,
        summary=summary,
        sample_indices=np.linspace(0, num_val - 1, min(logger.num_images, num_val)).round().astype(int),
        oom_message=_out_of_memory_message(cfg, device, amp_dtype),
    )


def build_model(model_cfg: DictConfig, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """Instantiate the configured model on ``device``, in NHWC memory order when asked.

    NHWC (channels-last) makes convolutions faster on CPUs (oneDNN) and on tensor cores.
    """
    model = instantiate(model_cfg).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_data(cfg: DictConfig, crop: tuple[int, int]) -> tuple[DataLoader, DataLoader, dict]:
    """The training and validation loaders of this rank, and the data scan's reports by split.

    Files on disk through albumentations; uint8 until normalised on the device. Rank 0 goes first:
    it generates the built-in dataset and fills the scan cache, the others reuse them. Every file is
    checked before the first step (cached): bad files end the run here, named.
    """
    data, trainer, main_rank = cfg.data, cfg.trainer, distributed.is_main()
    with distributed.rank_zero_first():
        build.prepare_data_root(data)
        train_set = build.build_dataset(data, data.train_split, instantiate(cfg.aug))
        val_set = build.build_dataset(data, data.val_split, None)
        log.info(
            "data %s: %d train / %d val images from %s",
            data.name,
            len(train_set),
            len(val_set),
            Path(data.root).resolve(),
        )
        reports = {r.split: r for r in build.scan_data(data, [data.train_split, data.val_split])}
    val_report = reports.get(data.val_split)
    train_sizes = reports[data.train_split].image_sizes if data.train_split in reports else {}
    # A crop larger than every image, or data=folder's own 512 larger than most: one line with the fix.
    too_big = crop_padding_warning(crop, train_sizes) or folder_crop_warning(data, train_sizes)
    if too_big and main_rank:
        log.warning("%s", too_big)
    # Each rank draws its own share of every epoch's order; validation is split without repeats.
    # Images of different sizes are scored one at a time, so no padding ever reaches the model.
    val_batch_size = trainer.batch_size if val_report is None or val_report.uniform_size else 1
    train_loader, val_loader = build.loaders(
        train_set,
        val_set,
        trainer,
        ignore_index=data.ignore_index,
        seed=cfg.seed,
        val_batch_size=val_batch_size,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        val_sampler=distributed.shard(len(val_set)),
    )
    for short in short_batch_warnings(trainer.batch_size, train_loader.sampler.per_rank, len(val_set), val_batch_size):
        log.warning("%s", short) if main_rank else None  # a batch larger than a split is never silent
    return train_loader, val_loader, reports


def resume_run(run: Run, resume: str | None) -> TrainState | None:
    """The state of the earlier run ``resume=`` names, restored into ``run``'s parts (see
    :func:`fcn.resume.resume_training`); None for a fresh run."""
    return resume_training(
        resume,
        run.out_dir,
        run.config,
        run.shape,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.settings.scaler,
        ema=run.ema,
    )


def fit(
    run: Run,
    state: TrainState,
    stop: GracefulStop | None = None,
    on_validation: Callable[[int, dict], None] | None = None,
    *,
    resumed: bool = False,
) -> TrainState:
    """The epoch loop from ``state``: train an epoch, validate, keep the best and the last
    checkpoint, stop early or on a signal; returns the final state.

    On resume the logger drops whatever the interrupted run logged after its checkpoint. Raises
    :class:`TrainingInterrupted` after saving ``last.pt`` when a signal stopped it (on any rank),
    :class:`UserError` for a diverged loss or out of memory; ``on_validation`` as in :func:`train`.
    """
    run.logger.open(run.out_dir, purge_step=state.step + 1 if resumed else None)
    if not resumed:
        log_run_start(run.logger, run.summary, OmegaConf.to_yaml(run.config))  # layout, summary, config
    if state.epoch_batches >= run.shape.batches_per_epoch:  # the checkpoint closed its epoch
        state = dataclasses.replace(state, epoch=state.epoch + 1, epoch_batches=0)
    # After the resume: DistributedDataParallel starts every rank from rank 0's weights and buffers.
    train_net = distributed.wrap(run.net, run.settings.device)
    shared_stop = distributed.SharedStop(stop or GracefulStop())  # a signal seen by any rank stops all of them
    clock = RunClock(run.shape.total_steps, state.step)  # the bar's whole-run ETA
    try:
        while state.epoch <= run.loop.epochs:
            epoch = state.epoch
            with _explained_failures(run):
                state, metrics = run_epoch(run, state, train_net, shared_stop, clock)
            if metrics is not None and on_validation is not None:
                on_validation(epoch, metrics)  # outside the error translation: what it raises goes out unchanged
            # Stop: on a signal (also one during validation), or when val mIoU has stopped improving.
            if shared_stop.poll(state.step) and epoch < run.loop.epochs:
                distributed.barrier()
                raise TrainingInterrupted(shared_stop.requested, run.last_pt)
            if run.loop.patience and state.stale >= run.loop.patience:
                log.info("early stopping: val mIoU has not improved for %d validations", run.loop.patience)
                break
            state = dataclasses.replace(state, epoch=epoch + 1, epoch_batches=0)
    except TrainingInterrupted as stopped:
        stopped.best = state.best  # what train() reports for a stopped run
        raise
    finally:
        run.logger.close()
    return state


def run_epoch(
    run: Run, state: TrainState, train_net: torch.nn.Module, stop: distributed.SharedStop, clock: RunClock
) -> tuple[TrainState, dict | None]:
    """Train (the rest of) one epoch, then validate when due and save ``last.pt`` (and ``best.pt``
    on a better val mIoU); returns the new state and the validation's metrics (None when not due).

    A resumed epoch continues at the batch it stopped at. Raises :class:`TrainingInterrupted`
    after saving ``last.pt`` when a signal stopped the epoch early.
    """
    epoch, epochs, shape = state.epoch, run.loop.epochs, run.shape
    to_validate = validations_left(epoch, epochs, run.loop.val_every)
    run.train_loader.sampler.set_epoch(epoch, start=state.epoch_batches * shape.batch_size)
    clock.start_epoch()
    result = train_one_epoch(
        train_net,
        run.train_loader,
        run.optimizer,
        run.scheduler,
        run.loss_fn,
        run.settings,
        step=state.step,
        max_steps=(shape.batches_per_epoch - state.epoch_batches) // shape.accumulate_grad_batches,
        on_step=partial(after_step, run, state, stop),
        bar=Bar(epoch_description(epoch, epochs), partial(_eta, clock, to_validate=to_validate))
        if distributed.is_main()
        else None,
    )
    clock.end_epoch()
    state = dataclasses.replace(state, step=result.step, epoch_batches=state.epoch_batches + result.batches)
    if state.epoch_batches < shape.batches_per_epoch:  # stopped mid-epoch by a signal
        save(run, run.last_pt, state)
        distributed.barrier()  # no rank exits before rank 0 has saved
        raise TrainingInterrupted(stop.requested or 0, run.last_pt)
    metrics = None
    # Validate every val_every epochs and after the last; the best val mIoU is kept as best.pt.
    if epoch % run.loop.val_every == 0 or epoch == epochs:
        started = clock.now()
        metrics = validate(run, state.step)
        clock.add_validation(clock.now() - started)
        log.info(  # scores in percent, as the tables print them
            "epoch %d/%d: train loss %.4f, val loss %.4f, val mIoU %.2f%%, pixel acc %.2f%%",
            epoch,
            epochs,
            result.loss,
            metrics["val_loss"],
            100 * metrics["miou"],
            100 * metrics["pixel_acc"],
        )
        state = keep_best(run, state, metrics)
    else:
        log.info("epoch %d/%d: train loss %.4f", epoch, epochs, result.loss)
    save(run, run.last_pt, state, metrics)
    return state, metrics


def after_step(
    run: Run,
    epoch_start: TrainState,
    stop: distributed.SharedStop,
    step: int,
    loss: float | None,
    lr: float,
    grad_norm: float | None,
) -> bool:
    """After each optimisation step of the epoch that began at ``epoch_start``: update the EMA,
    log the step, save ``last.pt`` every ``checkpoint_every`` steps (an epoch's end is saved after
    its validation); True: stop (a signal seen by any rank). A skipped step (``loss`` None) is only polled."""
    if loss is None:
        return stop.poll(step)
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    logger = run.logger
    if logger.log_every_n_steps and step % logger.log_every_n_steps == 0:
        logger.log_scalar("train/loss", loss, step)
        logger.log_scalar("train/lr", lr, step)
        if grad_norm is not None:
            logger.log_scalar("weights/grad_norm", grad_norm, step)
    done = epoch_start.epoch_batches + (step - epoch_start.step) * run.shape.accumulate_grad_batches
    every = run.loop.checkpoint_every
    if every and step % every == 0 and done < run.shape.batches_per_epoch:
        save(run, run.last_pt, dataclasses.replace(epoch_start, epoch_batches=done, step=step))
    return stop.poll(step)


def validate(run: Run, step: int) -> dict:
    """Score this rank's share of the validation set (summed over ranks), log it, draw the samples."""
    distributed.broadcast_buffers(run.model)  # every rank scores the model rank 0 saves
    if run.ema is not None:
        distributed.broadcast_buffers(run.ema.module)
    evaluation = evaluate(
        run.eval_net,
        run.val_loader,
        run.settings,
        loss_fn=run.loss_fn,
        max_batches=run.loop.limit_val_batches,
        infer=run.infer,
        desc="val" if distributed.is_main() else None,
    )
    evaluation = combine_ranks(evaluation)  # exact: integer confusion counts summed over ranks
    class_names = run.info["class_names"]
    metrics = scores(evaluation.confusion, class_names) | {"val_loss": evaluation.loss}
    log_validation(run.logger, step, metrics, evaluation.confusion, class_names, run.model)
    if len(run.sample_indices):
        s = run.settings
        to_input = partial(to_model_input, device=s.device, mean=s.mean, std=s.std, channels_last=s.channels_last)
        samples = (run.val_loader.dataset, run.sample_indices, run.info["palette"], s.ignore_index)
        run.logger.log_image("val/samples", sample_grid(run.eval_net, *samples, to_input, s.amp_dtype), step)
    return metrics


def keep_best(run: Run, state: TrainState, metrics: dict) -> TrainState:
    """``state`` after a validation: a better val mIoU becomes the best (saved as ``best.pt``, its
    scores recorded); else one more validation without improvement."""
    if state.best is None or metrics["miou"] > state.best["miou"]:
        best = {k: metrics[k] for k in METRIC_KEYS}
        best |= {"epoch": state.epoch, "step": state.step, "checkpoint": str(run.best_pt)}
        state = dataclasses.replace(state, best=best, stale=0)
        save(run, run.best_pt, state, metrics)
        return state
    return dataclasses.replace(state, stale=state.stale + 1)


def save(run: Run, path: Path, state: TrainState, metrics: dict | None = None) -> None:
    """Write a checkpoint: the training state plus what evaluation needs (config, classes, colours).

    Called by every rank at the same points: each rank's random state goes in (each resumes its
    own dropout masks), the rest is rank 0's, and only rank 0 writes.
    """
    rng = distributed.gather_objects(capture_rng_state())
    if not distributed.is_main():
        return
    averaged = run.ema is not None and path == run.best_pt  # best.pt is what validated: the average
    scaler = run.settings.scaler
    checkpoint = {
        "model": run.ema.module.state_dict() if averaged else run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng[0],
        "rng_by_rank": rng if run.shape.world_size > 1 else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": {**dataclasses.asdict(state), **dataclasses.asdict(run.shape)},
        "epoch": state.epoch,
        "step": state.step,
        "metrics": metrics,
        **run.info,
        **({} if run.ema is None else {"ema": run.ema.state_dict()}),
    }
    save_checkpoint(checkpoint, path, keep_previous=path.name == "last.pt")


def finish(run: Run, cfg: DictConfig, best: dict, started: tuple[float, float], status: str) -> dict:
    """The report of a finished or stopped run: its HPARAMS row (the best scores beside the main
    settings) and :func:`report`, with what the run cost (minutes and CPU seconds of this process
    since ``started``, a ``(time.time(), CPU seconds)`` pair) and how to repeat it."""
    run.logger.log_hparams(_hparams(cfg), best_scores(best), run_name=run_name(), step=best["step"])
    wall, cpu = started
    facts = {
        "status": status,
        "seed": cfg.seed,
        "epochs": cfg.trainer.epochs,
        "minutes": round((time.time() - wall) / 60, 2),  # this process's: a resumed run counts its last session
        "cpu_seconds": round(_cpu_seconds() - cpu, 1),  # every thread's, and finished data-loading workers'
        "machine": f"{device_name(run.settings.device)}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "scripts/train.py", *command_overrides()]),
        "class_names": run.info["class_names"],
    }
    return report(run, best, facts)


def report(run: Run, best: dict, facts: dict | None = None) -> dict:
    """``metrics.json`` and a table of the best checkpoint's validation scores, followed by ``facts``
    about the run (status, seed, minutes, CPU seconds, machine, date, command: what a results table
    needs, ``scripts/results_tables.py add``).

    The scores were computed with exactly its weights when it was chosen (evaluation is
    deterministic), so they are reported as they are, not recomputed. Its path is where it lies in
    this run (a moved or copied run names its own); a run resumed from another run's checkpoint
    names that run's best.pt until it beats it. A checkpoint written before a score existed lacks it.
    """
    data = run.config["data"]
    scores_ = {k: best[k] for k in METRIC_KEYS if k in best} | {
        "checkpoint": best["checkpoint"],
        "epoch": best["epoch"],
        "step": best["step"],
        "split": data["val_split"],
        **(facts or {}),
    }
    if not distributed.is_main():  # ranks other than 0 return the same report, silently
        return scores_
    out_dir = run.out_dir
    # complete or absent, never half-written; a full disk reaches the entry point's one-line message
    with atomic_path(out_dir / "metrics.json", one_line=False) as tmp:
        tmp.write_text(to_json(scores_))
    print(f"\nbest checkpoint {best['checkpoint']} (epoch {best['epoch']}), {data['name']} {data['val_split']}:")
    print(format_table(scores_))
    print(f"metrics: {out_dir / 'metrics.json'}")
    if (out_dir / "tensorboard").is_dir():  # logger=none writes no events
        print(f"TensorBoard: tensorboard --logdir {out_dir}")
    return scores_


def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its children that have exited."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _checkpoint_info(config: dict, data: DictConfig) -> dict:
    """What every checkpoint carries besides the training state: what evaluation needs."""
    return {
        "config": config,
        "class_names": list(data.class_names),
        "palette": [list(c) for c in data.palette] if data.palette else default_palette(data.num_classes),
        "num_classes": data.num_classes,
        "ignore_index": data.ignore_index,
        "mean": list(data.mean),
        "std": list(data.std),
    }


def _log_shape_and_model(cfg: DictConfig, shape: RunShape, summary: dict, device: torch.device) -> None:
    """The images per optimisation step (when more than one process or batch make it) and the model's size."""
    world, accumulate = shape.world_size, shape.accumulate_grad_batches
    if world > 1 or accumulate > 1:
        log.info(
            "%d process(es) x batch %d x %d accumulated = %d images per optimisation step, %d steps per epoch",
            world,
            shape.batch_size,
            accumulate,
            world * shape.batch_size * accumulate,
            shape.steps_per_epoch,
        )
    log.info(
        "model %s-fcn%s: %.2fM parameters (%.2fM trainable, %.2fM frozen), %.2f GFLOPs/image forward at %s, device %s",
        cfg.model.backbone,
        cfg.model.variant,
        summary["parameters"] / 1e6,
        summary["trainable"] / 1e6,
        summary["frozen"] / 1e6,
        summary["forward_gflops_per_image"],
        summary["crop"],
        device,
    )


def _eta(clock: RunClock, step: int, to_validate: int) -> dict:
    seconds = clock.eta(step, to_validate)
    return {} if seconds is None else {"run_eta": format_duration(seconds)}


@contextlib.contextmanager
def _explained_failures(run: Run):
    """A diverged loss or an out-of-memory error as one line the user can act on (exit 2)."""
    try:
        yield
    except NonFiniteLossError as exc:
        last = run.last_pt
        raise UserError(
            f"{exc.summary()}; "
            f"last good checkpoint: {last if last.exists() else 'none yet'}. Lower optim.lr, check the data, "
            "or set trainer.skip_nonfinite=K to skip up to K bad steps in a row"
        ) from exc
    except (torch.OutOfMemoryError, MemoryError) as exc:  # torch's first line says how much was asked for
        raise UserError(f"{run.oom_message} ({cause(exc)})") from exc
    except RuntimeError as exc:
        if "out of memory" in str(exc) or "can't allocate memory" in str(exc):
            raise UserError(f"{run.oom_message} ({cause(exc)})") from exc
        raise


def _hparams(cfg: DictConfig) -> dict:
    """The run's main settings, shown beside its best val mIoU (TensorBoard's HPARAMS tab).

    The tab shows five settings until more are ticked: those that differ between the runs first,
    then by name. The five main ones sort first by name; the others are named ``setup.*`` to sort
    after them.
    """
    return {
        "model": f"{cfg.model.backbone}-fcn{cfg.model.variant}",
        "optimizer": cfg.optim._target_.rsplit(".", 1)[-1],
        "lr": cfg.optim.lr,
        "batch_size": cfg.trainer.batch_size,
        "epochs": cfg.trainer.epochs,
        "setup.data": cfg.data.name,
        "setup.width": cfg.model.width,
        "setup.upsampling": str(cfg.model.upsampling),  # learned, frozen, intermediate, random or interpolate
        "setup.scaled_skips": bool(cfg.model.get("scaled_skips", False)),
        "setup.init_from": str(cfg.init_from or ""),  # staged training: which stage this one started from
        "setup.seed": cfg.seed,
        **override_hparams(),  # the keys a sweep or search set, so its rows differ visibly
    }


def _out_of_memory_message(cfg: DictConfig, device, amp_dtype) -> str:
    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "float32"
    hint = "" if amp_dtype is not None or device.type != "cuda" else ", or trainer.precision=bf16"
    return (
        f"out of memory on {device} with trainer.batch_size={cfg.trainer.batch_size}, "
        f"data.crop_size={cfg.data.crop_size}, precision {precision}, "
        f"model {cfg.model.backbone}-fcn{cfg.model.variant}: "
        f"lower trainer.batch_size first, then data.crop_size (or model.width for the tiny backbone){hint}"
    )
