"""The training run, read top to bottom: set-up from the composed config, the epoch loop, the report.

:func:`train` is the one function that reads the whole config (as lightning-hydra-template's
``train(cfg)``); the data set-up goes through :mod:`fcn.data.build`, the model, optimiser,
schedule and loss through Hydra's ``instantiate``, and everything it calls below takes plain
values. ``fcn/cli/train.py`` wraps it in the process plumbing (Hydra, torchrun, SLURM, signals).

Inside a process group (one process of a ``torchrun`` job, see :mod:`fcn.distributed`) every rank
runs :func:`train` with the same config: the model trains in DistributedDataParallel on this
rank's share of each batch, validation is split between the ranks and summed, only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fcn import distributed
from fcn.checkpoint import check_architecture, save_checkpoint
from fcn.cli.console import log_config_changes, run_name
from fcn.config import crop_padding_warning, validate_train_config, warmup_warning
from fcn.data import build
from fcn.data.loader import short_batch_warnings
from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
from fcn.device import maybe_compile, resolve_channels_last, resolve_device, resolve_precision, set_deterministic
from fcn.engine import Bar, NonFiniteLossError, Settings, combine_ranks, evaluate, to_model_input, train_one_epoch
from fcn.errors import UserError, cause
from fcn.inference import inference_fn
from fcn.loggers import NullLogger
from fcn.metrics import format_table, scores
from fcn.optim import build_optimizer
from fcn.progress import RunClock, epoch_description, format_duration, validations_left
from fcn.report import to_json
from fcn.resume import (
    METRIC_KEYS,
    TrainState,
    agreed_resume_checkpoint,
    check_same_run_shape,
    init_weights,
    plan_epochs,
    restore_training_state,
)
from fcn.rng import capture_rng_state, seed_everything
from fcn.run_logging import best_scores, log_run_start, log_validation, sample_grid
from fcn.rundir import check_resume_config, refuse_fresh_start
from fcn.signals import GracefulStop, TrainingInterrupted
from fcn.summary import model_summary
from fcn.throughput import ThroughputWatch
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
    # --- Checks and the process: every value checked before any set-up (one line naming the key).
    validate_train_config(cfg)
    set_max_image_pixels(cfg.data.get("max_image_pixels", PILLOW_DEFAULT))  # before any image is opened
    out_dir, data, trainer = Path(out_dir), cfg.data, cfg.trainer
    main_rank, rank, world = distributed.is_main(), distributed.rank(), distributed.world_size()
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

    # --- Model first: missing pretrained weights or a bad init_from end the run before a data scan.
    model = build_model(cfg.model, device, channels_last)
    if cfg.init_from:
        init_weights(model, Path(cfg.init_from), config["model"])

    # --- Data: files on disk through albumentations; uint8 until normalised on the device. Rank 0
    # goes first: it generates the built-in dataset and fills the scan cache, the others reuse them.
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
        # Every file checked before the first step (cached): bad files end the run here, named.
        reports = {r.split: r for r in build.scan_data(data, [data.train_split, data.val_split])}
    val_report = reports.get(data.val_split)
    train_sizes = reports[data.train_split].image_sizes if data.train_split in reports else {}
    if (too_big := crop_padding_warning(crop, train_sizes)) and main_rank:
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
        rank=rank,
        world_size=world,
        val_sampler=distributed.shard(len(val_set)),
    )
    sampler = train_loader.sampler
    for short in short_batch_warnings(trainer.batch_size, sampler.per_rank, len(val_set), val_batch_size):
        log.warning("%s", short) if main_rank else None  # a batch larger than a split is never silent
    shape = plan_epochs(
        sampler.per_rank,
        batch_size=trainer.batch_size,
        drop_last=train_loader.drop_last,
        accumulate=trainer.accumulate_grad_batches,
        epochs=trainer.epochs,
        limit_train_batches=trainer.limit_train_batches,
        world_size=world,
    )
    accumulate = shape.accumulate_grad_batches
    if world > 1 or accumulate > 1:
        log.info(
            "%d process(es) x batch %d x %d accumulated = %d images per optimisation step, %d steps per epoch",
            world,
            shape.batch_size,
            accumulate,
            world * shape.batch_size * accumulate,
            shape.steps_per_epoch,
        )

    # --- Optimiser, schedule, loss.
    summary = model_summary(model, crop, device)
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
    ema_decay = trainer.get("ema_decay")  # in (0, 1) or null: fcn/cli/settings.py
    ema = (
        None
        if ema_decay is None
        else AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    )
    eval_net = net if ema is None else ema.module
    infer = inference_fn(cfg.eval, data.num_classes)

    # --- The state of an earlier run, when resuming: it must have had the same shape.
    state = TrainState()
    if world > 1:  # the model is built (alike everywhere): from here on each rank draws its own dropout masks
        seed_everything(cfg.seed + rank)
    resumed = agreed_resume_checkpoint(cfg.resume, out_dir / "checkpoints")
    if resumed is not None:
        saved, source = resumed
        check_architecture(saved["config"]["model"], config["model"], source)
        check_same_run_shape(saved["progress"], dataclasses.asdict(shape), source)
        # Every other changed key: refused if it changes what is learned, else applied and listed.
        if applied := check_resume_config(saved["config"], config, source):
            log.warning(
                "resuming %s with changed settings that do not change what is learned: %s", source, "; ".join(applied)
            )
        state = TrainState.from_progress(restore_training_state(saved, model, optimizer, scheduler, scaler, rank))
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])  # else it starts from the resumed weights
        log.info("resumed from %s at epoch %d, batch %d, step %d", source, state.epoch, state.epoch_batches, state.step)
        if state.step >= shape.total_steps:  # nothing left to train: say so rather than look like a run
            log.warning(
                "%s is a finished run (step %d of %d, trainer.epochs=%d): nothing to train; its best checkpoint's "
                "scores follow. To train on, start a new run from it with init_from=%s",
                source,
                state.step,
                shape.total_steps,
                trainer.epochs,
                source,
            )
    # After the resume: DistributedDataParallel starts every rank from rank 0's weights and buffers.
    train_net = distributed.wrap(net, device)

    # --- Checkpoints: the training state plus what evaluation needs (config, classes, colours).
    palette = [list(c) for c in data.palette] if data.palette else default_palette(data.num_classes)
    class_names = list(data.class_names)
    run_info = {
        "config": config,
        "class_names": class_names,
        "palette": palette,
        "num_classes": data.num_classes,
        "ignore_index": data.ignore_index,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    last_pt, best_pt = out_dir / "checkpoints" / "last.pt", out_dir / "checkpoints" / "best.pt"

    def save(path: Path, state: TrainState, metrics: dict | None = None) -> None:
        """Called by every rank at the same points: each rank's random state goes in (each resumes
        its own dropout masks), the rest is rank 0's, and only rank 0 writes."""
        rng = distributed.gather_objects(capture_rng_state())
        if not distributed.is_main():
            return
        averaged = ema is not None and path == best_pt  # best.pt is what validated: the average
        checkpoint = {
            "model": ema.module.state_dict() if averaged else model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng[0],
            "rng_by_rank": rng if shape.world_size > 1 else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "progress": {**dataclasses.asdict(state), **dataclasses.asdict(shape)},
            "epoch": state.epoch,
            "step": state.step,
            "metrics": metrics,
            **run_info,
            **({} if ema is None else {"ema": ema.state_dict()}),
        }
        save_checkpoint(checkpoint, path, keep_previous=path.name == "last.pt")

    # --- The loop's helpers: what runs after every step, and one validation.
    epochs, val_every = trainer.epochs, trainer.get("val_every", 1)
    checkpoint_every = trainer.get("checkpoint_every_n_steps")
    patience = trainer.get("early_stopping_patience")
    # A signal seen by any rank stops all of them after the same step.
    shared_stop = distributed.SharedStop(stop or GracefulStop())
    clock = RunClock(shape.total_steps, state.step)  # the bar's whole-run ETA
    # Warns, with the fix, when a stretch of training runs at under half this run's best speed
    # (rank 0 only: every rank would say the same).
    watch = ThroughputWatch(torch.get_num_threads(), device.type) if main_rank else None
    sample_indices = np.linspace(0, len(val_set) - 1, min(logger.num_images, len(val_set))).round().astype(int)

    def on_step(step: int, loss: float | None, lr: float, grad_norm: float | None) -> bool:
        """After each step: feed the slow-down watch, log the step, save ``last.pt`` every
        ``checkpoint_every`` steps (an epoch's end is saved after its validation); True: stop
        (a signal seen by any rank). A skipped step (``loss`` None) is only polled."""
        if loss is None:
            return shared_stop.poll(step)
        if ema is not None:
            ema.update_parameters(model)
        if watch is not None and (slow := watch.step(shape.batch_size * accumulate)):
            log.warning("%s", slow)
        if logger.log_every_n_steps and step % logger.log_every_n_steps == 0:
            logger.log_scalar("train/loss", loss, step)
            logger.log_scalar("train/lr", lr, step)
            if grad_norm is not None:
                logger.log_scalar("weights/grad_norm", grad_norm, step)
        done = epoch_start.epoch_batches + (step - epoch_start.step) * accumulate
        if checkpoint_every and step % checkpoint_every == 0 and done < shape.batches_per_epoch:
            if watch is not None:
                watch.pause()  # saving is not training
            save(last_pt, dataclasses.replace(epoch_start, epoch_batches=done, step=step))
            if watch is not None:
                watch.resume()
        return shared_stop.poll(step)

    def validate(step: int) -> dict:
        """Score this rank's share of the validation set (summed over ranks), log it, draw the samples."""
        distributed.broadcast_buffers(model)  # every rank scores the model rank 0 saves
        if ema is not None:
            distributed.broadcast_buffers(ema.module)
        evaluation = evaluate(
            eval_net,
            val_loader,
            settings,
            loss_fn=loss_fn,
            max_batches=trainer.get("limit_val_batches"),
            infer=infer,
            desc="val" if main_rank else None,
        )
        evaluation = combine_ranks(evaluation)  # exact: integer confusion counts summed over ranks
        metrics = scores(evaluation.confusion, class_names) | {"val_loss": evaluation.loss}
        log_validation(logger, step, metrics, evaluation.confusion, class_names, model)
        if len(sample_indices):
            to_input = lambda images: to_model_input(images, device, data.mean, data.std, channels_last)  # noqa: E731
            grid = sample_grid(eval_net, val_set, sample_indices, palette, data.ignore_index, to_input, amp_dtype)
            logger.log_image("val/samples", grid, step)
        return metrics

    # --- The epoch loop: train an epoch, validate, keep the best and the last checkpoint, stop
    # early or on a signal. On resume the logger drops whatever the interrupted run logged after
    # its checkpoint.
    logger.open(out_dir, purge_step=state.step + 1 if resumed else None)
    if not resumed:
        log_run_start(logger, summary, OmegaConf.to_yaml(config))  # layout, summary, config
    if state.epoch_batches >= shape.batches_per_epoch:  # the checkpoint closed its epoch
        state = dataclasses.replace(state, epoch=state.epoch + 1, epoch_batches=0)
    try:
        while state.epoch <= epochs:
            epoch, epoch_start, metrics = state.epoch, state, None
            to_validate = validations_left(epoch, epochs, val_every)
            with _explained_failures(cfg, device, amp_dtype, last_pt):
                # Train (the rest of) one epoch; a resumed epoch continues at the batch it stopped at.
                sampler.set_epoch(epoch, start=state.epoch_batches * shape.batch_size)
                clock.start_epoch()
                if watch is not None:
                    watch.resume()  # the time since the last epoch's end (validation, saving) is not training
                result = train_one_epoch(
                    train_net,
                    train_loader,
                    optimizer,
                    scheduler,
                    loss_fn,
                    settings,
                    step=state.step,
                    max_steps=(shape.batches_per_epoch - state.epoch_batches) // accumulate,
                    on_step=on_step,
                    bar=Bar(epoch_description(epoch, epochs), lambda step, left=to_validate: _eta(clock, step, left))
                    if main_rank
                    else None,
                )
                clock.end_epoch()
                if watch is not None:
                    watch.pause()
                state = dataclasses.replace(state, step=result.step, epoch_batches=state.epoch_batches + result.batches)
                if state.epoch_batches < shape.batches_per_epoch:  # stopped mid-epoch by a signal
                    save(last_pt, state)
                    distributed.barrier()  # no rank exits before rank 0 has saved
                    raise TrainingInterrupted(shared_stop.requested or 0, last_pt)

                # Validate every val_every epochs and after the last; the best val mIoU is kept as best.pt.
                if epoch % val_every == 0 or epoch == epochs:
                    started = clock.now()
                    metrics = validate(state.step)
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
                    if state.best is None or metrics["miou"] > state.best["miou"]:
                        best = {k: metrics[k] for k in METRIC_KEYS}
                        best |= {"epoch": epoch, "step": state.step, "checkpoint": str(best_pt)}
                        state = dataclasses.replace(state, best=best, stale=0)
                        save(best_pt, state, metrics)
                    else:
                        state = dataclasses.replace(state, stale=state.stale + 1)
                else:
                    log.info("epoch %d/%d: train loss %.4f", epoch, epochs, result.loss)
                save(last_pt, state, metrics)
            if metrics is not None and on_validation is not None:
                on_validation(epoch, metrics)  # outside the error translation: what it raises goes out unchanged

            # Stop: on a signal (also one during validation), or when val mIoU has stopped improving.
            if shared_stop.poll(state.step) and epoch < epochs:
                distributed.barrier()
                raise TrainingInterrupted(shared_stop.requested, last_pt)
            if patience and state.stale >= patience:
                log.info("early stopping: val mIoU has not improved for %d validations", patience)
                break
            state = dataclasses.replace(state, epoch=epoch + 1, epoch_batches=0)
    finally:
        logger.close()

    # --- The report: the best checkpoint's scores, as computed when it was chosen.
    if state.best is not None:
        logger.log_hparams(_hparams(cfg), best_scores(state.best), run_name=run_name(), step=state.best["step"])
    return _report(state.best, out_dir, data, write=main_rank)


def build_model(model_cfg: DictConfig, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """Instantiate the configured model on ``device``, in NHWC memory order when asked.

    NHWC (channels-last) makes convolutions faster on CPUs (oneDNN) and on tensor cores.
    """
    model = instantiate(model_cfg).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _eta(clock: RunClock, step: int, to_validate: int) -> dict:
    seconds = clock.eta(step, to_validate)
    return {} if seconds is None else {"run_eta": format_duration(seconds)}


@contextlib.contextmanager
def _explained_failures(cfg: DictConfig, device: torch.device, amp_dtype, last: Path):
    """A diverged loss or an out-of-memory error as one line the user can act on (exit 2)."""
    try:
        yield
    except NonFiniteLossError as exc:
        raise UserError(
            f"{exc.summary()}; "
            f"last good checkpoint: {last if last.exists() else 'none yet'}. Lower optim.lr, check the data, "
            "or set trainer.skip_nonfinite=K to skip up to K bad steps in a row"
        ) from exc
    except (torch.OutOfMemoryError, MemoryError) as exc:  # torch's first line says how much was asked for
        raise UserError(f"{_out_of_memory_message(cfg, device, amp_dtype)} ({cause(exc)})") from exc
    except RuntimeError as exc:
        if "out of memory" in str(exc) or "can't allocate memory" in str(exc):
            raise UserError(f"{_out_of_memory_message(cfg, device, amp_dtype)} ({cause(exc)})") from exc
        raise


def _report(best: dict, out_dir: Path, data: DictConfig, write: bool = True) -> dict:
    """``metrics.json`` and a table of the best checkpoint's validation scores.

    They were computed with exactly its weights when it was chosen (evaluation is deterministic),
    so they are reported as they are, not recomputed. Its path is where it was written: a run
    resumed from another directory may not beat it.
    """
    report = {k: best[k] for k in METRIC_KEYS} | {
        "checkpoint": best["checkpoint"],
        "epoch": best["epoch"],
        "step": best["step"],
        "split": data.val_split,
    }
    if not write:  # ranks other than 0 return the same report, silently
        return report
    (out_dir / "metrics.json").write_text(to_json(report))
    print(f"\nbest checkpoint {best['checkpoint']} (epoch {best['epoch']}), {data.name} {data.val_split}:")
    print(format_table(report))
    print(f"metrics: {out_dir / 'metrics.json'}")
    if (out_dir / "tensorboard").is_dir():  # logger=none writes no events
        print(f"TensorBoard: tensorboard --logdir {out_dir}")
    return report


def _hparams(cfg: DictConfig) -> dict:
    """The run's main settings, shown beside its best val mIoU (TensorBoard's HPARAMS tab).

    The tab shows five settings until more are ticked: those that differ between the runs first,
    then by name. The five main ones sort first by name; the others are named ``setup.*`` to sort
    after them.
    """
    from fcn.cli import multirun

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
        **multirun.override_hparams(),  # the keys a sweep or search set, so its rows differ visibly
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
