"""``fcn-train`` / ``python scripts/train.py``: train an FCN, then report its best checkpoint.

Composes the parts from the config (data, model, optimiser, the state of an earlier run), hands
them to :func:`fcn.fit.fit`, then writes ``metrics.json`` and prints the best checkpoint's
validation scores. The rest is Hydra and ``torchrun`` plumbing.

torch is imported inside :func:`train`, not at the top: ``--help`` and ``--cfg job`` answer
before it loads (seconds on a busy machine).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fcn.cli import CONFIG_DIR, hydra_run_dir, multirun  # hydra_run_dir registers ${fcn.claim_dir:...}
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.errors import UserError
from fcn.signals import GracefulStop, TrainingInterrupted

log = logging.getLogger(__name__)


def train(cfg: DictConfig, out_dir: str | Path, stop: GracefulStop | None = None) -> dict:
    """Train as ``cfg`` says, writing checkpoints, logs and ``metrics.json`` to ``out_dir``.

    ``stop`` is polled after every step (the entry point passes one wired to SIGTERM/SIGINT).
    Returns the best checkpoint's validation metrics; raises :class:`TrainingInterrupted` when
    stopped early. Inside a ``torchrun`` job every rank calls this with the same ``cfg`` and
    ``out_dir`` (``trainer.batch_size`` images per process); only rank 0 writes files.
    """
    import torch
    from hydra.utils import instantiate

    from fcn import distributed
    from fcn.checkpoint import check_architecture
    from fcn.cli.compose import (
        build_dataset,
        build_model,
        inference_fn,
        loader_options,
        pair,
        prepare_data_root,
        scan_data,
        with_class_weights,
    )
    from fcn.cli.console import log_config_changes, run_name
    from fcn.cli.validate import crop_padding_warning, validate_train_config, warmup_warning
    from fcn.data.loader import make_loader, short_batch_warnings
    from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
    from fcn.data.sampler import ResumableSampler
    from fcn.device import maybe_compile, resolve_channels_last, resolve_device, resolve_precision, set_deterministic
    from fcn.engine import NonFiniteLossError
    from fcn.errors import cause
    from fcn.fit import Checkpointer, DataInfo, FitSettings, TrainState, fit, log_run_start, plan_epochs
    from fcn.loggers import NullLogger
    from fcn.optim import build_optimizer
    from fcn.resume import agreed_resume_checkpoint, check_same_run_shape, init_weights, restore_training_state
    from fcn.rng import seed_everything
    from fcn.rundir import check_resume_config, refuse_fresh_start
    from fcn.summary import model_summary
    from fcn.visualize import default_palette

    validate_train_config(cfg)  # every value checked before any set-up (one line naming the key, exit 2)
    set_max_image_pixels(cfg.data.get("max_image_pixels", PILLOW_DEFAULT))  # before any image is opened
    out_dir = Path(out_dir)
    data, trainer = cfg.data, cfg.trainer
    main_rank, rank, world = distributed.is_main(), distributed.rank(), distributed.world_size()
    if main_rank and not cfg.resume:  # a fresh run never overwrites a checkpoint
        refuse_fresh_start(out_dir)
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", out_dir.resolve())
    if main_rank:
        log_config_changes(cfg)  # the overrides and what they changed; the path of the full config
    # A setting left without a value (data.num_classes: ???) is named here, before any file is read.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for key in ("epochs", "batch_size", "val_every", "accumulate_grad_batches"):
        if trainer[key] < 1:
            raise UserError(f"trainer.{key}={trainer[key]}: must be at least 1")
    # Every rank checks the logger's settings (so all stop alike); only rank 0 logs.
    logger = instantiate(cfg.logger)
    logger = logger if main_rank else NullLogger()
    seed_everything(cfg.seed)
    set_deterministic(trainer.deterministic)
    device = distributed.device_for_rank(resolve_device(trainer.device, trainer.threads))
    trainer.channels_last = resolve_channels_last(trainer.channels_last, cfg.model.backbone, device)  # auto: resolved

    # Data: files on disk through albumentations; uint8 until normalised on the device. Rank 0 goes
    # first: it generates the built-in dataset and fills the scan cache, the others reuse them.
    with distributed.rank_zero_first():
        prepare_data_root(data)
        train_set = build_dataset(data, data.train_split, instantiate(cfg.aug))
        val_set = build_dataset(data, data.val_split, None)
        log.info(
            "data %s: %d train / %d val images from %s",
            data.name,
            len(train_set),
            len(val_set),
            Path(data.root).resolve(),
        )
        # Every file checked before the first step (cached): bad files end the run here, named.
        reports = {r.split: r for r in scan_data(data, [data.train_split, data.val_split])}
    val_report = reports.get(data.val_split)
    train_sizes = reports[data.train_split].image_sizes if data.train_split in reports else {}
    if (too_big := crop_padding_warning(pair(data.crop_size), train_sizes)) and main_rank:
        log.warning("%s", too_big)
    # Images of different sizes are scored one at a time, so no padding ever reaches the model.
    val_batch_size = trainer.batch_size if val_report is None or val_report.uniform_size else 1
    # Each rank draws its own share of every epoch's order; validation is split without repeats.
    sampler = ResumableSampler(len(train_set), cfg.seed, rank=rank, world_size=world)
    drop_last = sampler.per_rank > trainer.batch_size  # BatchNorm dislikes a last batch of one
    for short in short_batch_warnings(trainer.batch_size, sampler.per_rank, len(val_set), val_batch_size):
        log.warning("%s", short) if main_rank else None  # a batch larger than a split is never silent
    train_loader = make_loader(
        train_set,
        batch_size=trainer.batch_size,
        ignore_index=data.ignore_index,
        sampler=sampler,
        drop_last=drop_last,
        seed=cfg.seed,
        **loader_options(trainer),
    )
    val_loader = make_loader(
        val_set,
        batch_size=val_batch_size,
        ignore_index=data.ignore_index,
        sampler=distributed.shard(len(val_set)),
        seed=cfg.seed,
        **loader_options(trainer),
    )
    shape = plan_epochs(
        sampler.per_rank,
        batch_size=trainer.batch_size,
        drop_last=drop_last,
        accumulate=trainer.accumulate_grad_batches,
        epochs=trainer.epochs,
        limit_train_batches=trainer.limit_train_batches,
        world_size=world,
    )
    if world > 1 or shape.accumulate_grad_batches > 1:
        log.info(
            "%d process(es) x batch %d x %d accumulated = %d images per optimisation step, %d steps per epoch",
            world,
            shape.batch_size,
            shape.accumulate_grad_batches,
            world * shape.batch_size * shape.accumulate_grad_batches,
            shape.steps_per_epoch,
        )

    # Model, optimiser, schedule, loss.
    model = build_model(cfg.model, device, trainer.channels_last)
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.init_from:
        init_weights(model, Path(cfg.init_from), model_config)
    summary = model_summary(model, pair(data.crop_size), device)
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
    net = maybe_compile(model, trainer.compile, trainer.batch_size, pair(data.crop_size), trainer.channels_last)
    optimizer = build_optimizer(instantiate(cfg.optim), model, trainer.decoder_lr_mult)
    scheduler = instantiate(cfg.sched)(optimizer, total_steps=shape.total_steps)
    if (too_long := warmup_warning(cfg.sched.get("warmup_steps"), shape.total_steps)) and main_rank:
        log.warning("%s", too_long)
    loss_fn = instantiate(with_class_weights(cfg.loss, data, reports.get(data.train_split)))

    # The state of an earlier run, when resuming: it must have had the same shape.
    state = TrainState()
    if world > 1:  # the model is built (alike everywhere): from here on each rank draws its own dropout masks
        seed_everything(cfg.seed + rank)
    resumed = agreed_resume_checkpoint(cfg.resume, out_dir / "checkpoints")
    if resumed is not None:
        saved, source = resumed
        check_architecture(saved["config"]["model"], model_config, source)
        check_same_run_shape(saved["progress"], dataclasses.asdict(shape), source)
        # Every other changed key: refused if it changes what is learned, else applied and listed.
        if applied := check_resume_config(saved["config"], OmegaConf.to_container(cfg, resolve=True), source):
            log.warning(
                "resuming %s with changed settings that do not change what is learned: %s", source, "; ".join(applied)
            )
        state = TrainState.from_progress(restore_training_state(saved, model, optimizer, scheduler, scaler, rank))
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

    palette = [list(c) for c in data.palette] if data.palette else default_palette(data.num_classes)
    run_info = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": list(data.class_names),
        "palette": palette,
        "num_classes": data.num_classes,
        "ignore_index": data.ignore_index,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    checkpointer = Checkpointer(out_dir / "checkpoints", model, optimizer, scheduler, scaler, shape, run_info)
    # The loop's settings are the trainer settings of the same names; its data facts come from the data config.
    names = [f.name for f in dataclasses.fields(FitSettings) if f.name in trainer]
    settings = FitSettings(amp_dtype=amp_dtype, **{name: trainer[name] for name in names})
    data_info = DataInfo(
        data.num_classes, data.ignore_index, tuple(data.mean), tuple(data.std), run_info["class_names"], palette
    )
    # On resume the logger drops whatever the interrupted run logged after its checkpoint.
    logger.open(out_dir, purge_step=state.step + 1 if resumed else None)
    if not resumed:
        log_run_start(logger, summary, OmegaConf.to_yaml(cfg, resolve=True))  # layout, summary, config
    try:
        state = fit(
            model,
            train_net,
            net,
            train_loader,
            val_loader,
            optimizer,
            scheduler,
            loss_fn,
            checkpointer,
            state=state,
            settings=settings,
            data=data_info,
            device=device,
            scaler=scaler,
            infer=inference_fn(cfg.eval, data.num_classes),
            logger=logger,
            stop=stop,
        )
    except NonFiniteLossError as exc:
        last = checkpointer.last
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
    finally:
        logger.close()
    if state.best is not None:
        best = {"hparam/best_val_miou": state.best["miou"], "hparam/best_pixel_acc": state.best["pixel_acc"]}
        logger.log_hparams(_hparams(cfg), best, run_name=run_name())
    return _report(state.best, out_dir, data, write=main_rank)


def _report(best: dict, out_dir: Path, data: DictConfig, write: bool = True) -> dict:
    """``metrics.json`` and a table of the best checkpoint's validation scores.

    They were computed with exactly its weights when it was chosen (evaluation is deterministic),
    so they are reported as they are, not recomputed. Its path is where it was written: a run
    resumed from another directory may not beat it.
    """
    from fcn.fit import METRIC_KEYS
    from fcn.metrics import format_table
    from fcn.report import to_json

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
    return {
        "model": f"{cfg.model.backbone}-fcn{cfg.model.variant}",
        "optimizer": cfg.optim._target_.rsplit(".", 1)[-1],
        "lr": cfg.optim.lr,
        "batch_size": cfg.trainer.batch_size,
        "epochs": cfg.trainer.epochs,
        "setup.data": cfg.data.name,
        "setup.width": cfg.model.width,
        "setup.learnable_upsampling": str(cfg.model.learnable_upsampling),  # true, false or intermediate
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


@suggest_keys("train")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> float:
    """Hydra entry point of one process; returns the best val mIoU (for sweepers)."""
    from fcn import distributed

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    # One task of a job started by the submitit launcher (SLURM's variables, or torchrun's set by the
    # launcher on this machine): every task runs this same Hydra job, in the same directory.
    launcher_task = distributed.adopt_slurm_environment() or distributed.launched_by_torchrun()
    if launcher_task and not distributed.is_initialized():
        with distributed.process_group():
            return _run_job(cfg, hydra_dir, tell_other_ranks=False)
    # Under torchrun the other ranks wait in main(), before their Hydra starts, for rank 0's directory.
    return _run_job(cfg, hydra_dir, tell_other_ranks=distributed.world_size() > 1)


def _run_job(cfg: DictConfig, hydra_dir: Path, tell_other_ranks: bool) -> float:
    """Train in the run directory until done or stopped by a signal (exit 128 + its number, after
    printing the command that resumes, and after submitit's requeue where it sent the signal); in a
    search, a user's mistake becomes a failed trial."""
    from fcn import distributed

    failed = None
    # Locked while it runs; a resume without hydra.run.dir continues in the resumed run's directory.
    with hydra_run_dir.run_directory(cfg, hydra_dir, distributed.is_main()) as run_dir:
        if tell_other_ranks and distributed.is_main():
            distributed.broadcast_object(str(run_dir))
        with GracefulStop(also=multirun.requeue_signals()) as stop:
            try:
                return train(cfg, run_dir, stop)["miou"]
            except TrainingInterrupted as exc:
                command = hydra_run_dir.resume_command(run_dir)
                log.warning("%s; saved %s. Resume with:\n  %s", exc, exc.checkpoint, command)
                signum = exc.signum
            except UserError as exc:
                if not multirun.failures_go_on():
                    raise
                failed = str(exc)  # raised below, outside this handler, so it is not a UserError's exit 2
    if failed is not None:  # one trial of a search: recorded as failed, the search goes on
        raise multirun.JobFailed(failed)
    multirun.hand_over_to_submitit(signum)  # under submitit: requeue with resume=auto
    sys.exit(128 + signum)


# Hydra flags that print and exit without running the task: no process group for those.
_INFO_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion")


def main() -> None:
    """``fcn-train`` / ``python scripts/train.py``: a plain run, or one process of a ``torchrun`` job.

    Under torchrun every process runs Hydra, which would give each its own timestamped run
    directory (and its own copy of the config and log). So the processes join their process group
    first; rank 0 runs Hydra as usual and sends its run directory to the others, which then run in
    that directory, writing neither ``.hydra/`` nor a log file, and printing only warnings.
    """
    argv = sys.argv[1:]
    if any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        with hydra_run_dir.print_only():  # no run directory is made for a command that only prints
            hydra_main()  # before importing torch (fcn.distributed): --help answers in a second
        return
    hydra_run_dir.check_pinned_run_dir(argv)  # a fresh run never takes a directory holding checkpoints
    from fcn import distributed

    distributed.adopt_slurm_environment()  # `srun python scripts/train.py`: SLURM's tasks join as torchrun's would
    if not distributed.launched_by_torchrun():
        hydra_main()
        return
    if any(a in ("-m", "--multirun") for a in argv):
        print("error: a sweep (-m) cannot run under torchrun; launch one torchrun per setting", file=sys.stderr)
        sys.exit(2)
    with distributed.process_group():
        if not distributed.is_main():
            sys.argv.extend(_other_rank_overrides(distributed.broadcast_object(None), distributed.rank()))
        hydra_main()


def _other_rank_overrides(run_dir: str, rank: int) -> list[str]:
    """Hydra overrides for a rank other than 0: rank 0's run directory, no second ``.hydra/`` or
    log file there, console output for warnings only, each line marked with the rank."""
    quoted = "'" + run_dir.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [
        f"hydra.run.dir={quoted}",
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra.job_logging.root.level=WARNING",
        f"hydra.job_logging.formatters.simple.format='[rank {rank}][%(levelname)s] - %(message)s'",
    ]


if __name__ == "__main__":
    main()
