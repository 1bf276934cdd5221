"""``fcn-train`` / ``python scripts/train.py``: train an FCN, then report its best checkpoint.

Reads top to bottom: data, model, optimiser, resume, the epoch loop (train, validate,
checkpoint), then ``metrics.json`` and a table of the best checkpoint's validation scores.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcn import distributed, rundir
from fcn.checkpoint import check_architecture, load_checkpoint, load_resumable, save_checkpoint
from fcn.cli.common import (
    CONFIG_DIR,
    build_dataset,
    build_model,
    exit_on_user_error,
    inference_fn,
    loader_options,
    maybe_compile,
    pair,
    prepare_data_root,
    resolve_device,
    resolve_precision,
    scan_data,
    set_deterministic,
    with_class_weights,
)
from fcn.data.loader import make_loader, pad_collate
from fcn.data.sampler import ResumableSampler
from fcn.engine import NonFiniteLossError, combine_ranks, evaluate, to_model_input, train_one_epoch
from fcn.errors import UserError
from fcn.metrics import format_table, scores
from fcn.optim import build_optimizer
from fcn.report import to_json
from fcn.rng import capture_rng_state, restore_rng_state, seed_everything
from fcn.signals import GracefulStop
from fcn.summary import decoder_drift, decoder_kernels, model_summary
from fcn.visualize import comparison_grid, confusion_image, default_palette

log = logging.getLogger(__name__)

METRIC_KEYS = ("miou", "pixel_acc", "mean_acc", "fwiou", "per_class_iou")


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``last.pt``; the exit code is 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.checkpoint = signum, checkpoint


def train(cfg: DictConfig, out_dir: str | Path, stop: GracefulStop | None = None) -> dict:
    """Train as ``cfg`` says, writing checkpoints, TensorBoard events and ``metrics.json`` to ``out_dir``.

    ``stop`` is polled after every step (the entry point passes one wired to SIGTERM/SIGINT).
    Returns the best checkpoint's validation metrics; raises :class:`TrainingInterrupted` when
    stopped early.

    Inside a process group (one process of a ``torchrun`` job, see :mod:`fcn.distributed`) every
    rank calls this with the same ``cfg`` and ``out_dir``: the model trains in
    DistributedDataParallel on this rank's share of each batch (``trainer.batch_size`` images
    per process), validation is split between the ranks and summed, and only rank 0 writes files.
    """
    out_dir = Path(out_dir)
    main_rank = distributed.is_main()  # the one process that writes files and logs to TensorBoard
    if main_rank and not cfg.resume:  # [rrun] a fresh run never overwrites a checkpoint
        rundir.refuse_fresh_start(out_dir)
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", out_dir.resolve())
    seed_everything(cfg.seed)
    set_deterministic(cfg.trainer.deterministic)
    device = distributed.device_for_rank(resolve_device(cfg.trainer.device, cfg.trainer.threads))
    rank, world = distributed.rank(), distributed.world_size()
    data, trainer = cfg.data, cfg.trainer
    for key in ("epochs", "batch_size", "val_every", "accumulate_grad_batches"):
        if trainer[key] < 1:
            raise UserError(f"trainer.{key}={trainer[key]}: must be at least 1")
    if cfg.logger.log_every_n_steps < 1:
        raise UserError(f"logger.log_every_n_steps={cfg.logger.log_every_n_steps}: must be at least 1")
    class_names = list(data.class_names)
    palette = [list(c) for c in data.palette] if data.palette else default_palette(data.num_classes)

    # Data: files on disk through albumentations; uint8 until normalised on the device.
    # Rank 0 goes first: it generates the built-in dataset and fills the scan cache, the others reuse them.
    with distributed.rank_zero_first():
        prepare_data_root(data)
        train_set = build_dataset(data, data.train_split, instantiate(cfg.aug))
        val_set = build_dataset(data, data.val_split, None)
        log.info(
            "data %s: %d train / %d val images from %s", data.name, len(train_set), len(val_set),
            Path(data.root).resolve(),
        )  # fmt: skip
        # Every file checked before the first step (cached): bad files end the run here, named.
        reports = {r.split: r for r in scan_data(data, [data.train_split, data.val_split])}
    val_report = reports.get(data.val_split)
    # Images of different sizes are scored one at a time, so no padding ever reaches the model.
    val_batch_size = trainer.batch_size if val_report is None or val_report.uniform_size else 1
    # Each rank draws its own share of every epoch's order; validation is split without repeats.
    sampler = ResumableSampler(len(train_set), cfg.seed, rank=rank, world_size=world)
    drop_last = sampler.per_rank > trainer.batch_size  # BatchNorm dislikes a last batch of one
    train_loader = make_loader(train_set, batch_size=trainer.batch_size, ignore_index=data.ignore_index,
                               sampler=sampler, drop_last=drop_last, seed=cfg.seed,
                               **loader_options(trainer))  # fmt: skip
    val_loader = make_loader(val_set, batch_size=val_batch_size, ignore_index=data.ignore_index,
                             sampler=distributed.shard(len(val_set)), seed=cfg.seed,
                             **loader_options(trainer))  # fmt: skip
    batches_per_epoch = sampler.per_rank // trainer.batch_size if drop_last else 1
    if trainer.limit_train_batches is not None:
        batches_per_epoch = min(batches_per_epoch, trainer.limit_train_batches)
    # One optimisation step per `accumulate` batches; the schedule counts steps. Batches that
    # cannot fill a last step of the epoch are not drawn (as drop_last does for images).
    accumulate = trainer.accumulate_grad_batches
    steps_per_epoch = batches_per_epoch // accumulate
    if steps_per_epoch < 1:
        raise UserError(
            f"trainer.accumulate_grad_batches={accumulate} but an epoch has only {batches_per_epoch} batches "
            f"per process: lower it or trainer.batch_size"
        )
    batches_per_epoch = steps_per_epoch * accumulate
    if world > 1 or accumulate > 1:
        log.info(
            "%d process(es) x batch %d x %d accumulated = %d images per optimisation step, %d steps per epoch",
            world, trainer.batch_size, accumulate, world * trainer.batch_size * accumulate, steps_per_epoch,
        )  # fmt: skip

    # Model, optimiser, schedule; then the state of an earlier run, when resuming.
    model = build_model(cfg.model, device, trainer.channels_last)
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.init_from:
        _init_weights(model, Path(cfg.init_from), model_config)
    summary = model_summary(model, pair(data.crop_size), device)
    log.info(
        "model %s-fcn%s: %.2fM parameters (%.2fM trainable, %.2fM frozen), %.2f GFLOPs/image forward at %s, device %s",
        cfg.model.backbone, cfg.model.variant, summary["parameters"] / 1e6, summary["trainable"] / 1e6,
        summary["frozen"] / 1e6, summary["forward_gflops_per_image"], summary["crop"], device,
    )  # fmt: skip
    if cfg.model.get("sync_bn"):
        model = distributed.sync_batch_norm(model, device)  # same parameters, so before or after init_from alike
    amp_dtype = resolve_precision(trainer.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    net = maybe_compile(model, trainer.compile, trainer.batch_size, pair(data.crop_size), trainer.channels_last)
    optimizer = build_optimizer(instantiate(cfg.optim), model, trainer.decoder_lr_mult)
    scheduler = instantiate(cfg.sched)(optimizer, total_steps=trainer.epochs * steps_per_epoch)
    loss_fn = instantiate(with_class_weights(cfg.loss, data, reports.get(data.train_split)))
    infer = inference_fn(cfg.eval, data.num_classes)
    ckpt_dir = out_dir / "checkpoints"
    # Where training stands: the epoch in progress, batches of it done (per process), global step,
    # best so far. The shape of the run (processes, batch size, accumulation, batches per epoch,
    # schedule length) must match on resume.
    shape = {"batch_size": trainer.batch_size, "batches_per_epoch": batches_per_epoch,
             "total_steps": trainer.epochs * steps_per_epoch, "world_size": world,
             "accumulate_grad_batches": accumulate}  # fmt: skip
    progress: dict[str, Any] = {"epoch": 1, "epoch_batches": 0, "step": 0, "best": None, "stale": 0, **shape}
    if world > 1:  # the model is built (alike everywhere): from here on each rank draws its own dropout masks
        seed_everything(cfg.seed + rank)
    resumed = _agreed_resume_checkpoint(cfg.resume, ckpt_dir)
    if resumed is not None:
        state, source = resumed
        check_architecture(state["config"]["model"], model_config, source)
        _check_same_run_shape(state["progress"], shape, source)
        # [rrun] every other changed key: refused if it changes what is learned, else applied and listed
        applied = rundir.check_resume_config(state["config"], OmegaConf.to_container(cfg, resolve=True), source)
        if applied:
            log.warning("resuming %s with changed settings that do not change what is learned: %s",
                        source, "; ".join(applied))  # fmt: skip
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng_states = state.get("rng_by_rank") or [state["rng"]]
        restore_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        progress = state["progress"]
        log.info("resumed from %s at epoch %d, batch %d, step %d", source, progress["epoch"],
                 progress["epoch_batches"], progress["step"])  # fmt: skip

    # After the resume: DistributedDataParallel starts every rank from rank 0's weights and buffers.
    train_net = distributed.wrap(net, device)

    # TensorBoard: on resume, purge whatever the interrupted run logged after its checkpoint.
    purge_step = progress["step"] + 1 if resumed else None
    writer = _make_writer(cfg.logger, out_dir, purge_step=purge_step) if main_rank else None
    if writer is not None and not resumed:
        writer.add_text("model/summary", "  \n".join(f"{k}: {v}" for k, v in summary.items()), 0)
    log_every = cfg.logger.log_every_n_steps

    def on_step(step: int, loss: float, lr: float, grad_norm: float | None) -> None:
        if writer is not None and step % log_every == 0:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", lr, step)
            if grad_norm is not None:
                writer.add_scalar("train/grad_norm", grad_norm, step)
        every = trainer.checkpoint_every_n_steps
        if every and step % every == 0:
            done = progress["epoch_batches"] + (step - epoch_start_step) * accumulate
            if done < batches_per_epoch:  # epoch ends are saved after validation
                save(ckpt_dir / "last.pt", {**progress, "epoch_batches": done, "step": step})

    run_info = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": class_names,
        "palette": palette,
        "num_classes": data.num_classes,
        "ignore_index": data.ignore_index,
        "mean": list(data.mean),
        "std": list(data.std),
    }

    def save(path: Path, progress_now: dict, metrics: dict | None = None) -> None:
        # Called by every rank at the same points: each rank's random state goes in (each resumes
        # its own dropout masks), the rest is rank 0's, and only rank 0 writes.
        rng = distributed.gather_objects(capture_rng_state())
        if not main_rank:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng[0],
            "rng_by_rank": rng if world > 1 else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "progress": progress_now,
            "epoch": progress_now["epoch"],
            "step": progress_now["step"],
            "metrics": metrics,
            **run_info,
        }
        save_checkpoint(state, path, keep_previous=path.name == "last.pt")

    sample_indices = np.linspace(0, len(val_set) - 1, min(cfg.logger.num_images, len(val_set))).round().astype(int)
    # A signal seen by any rank stops all of them after the same step.
    shared_stop = distributed.SharedStop(stop or GracefulStop())
    epoch = progress["epoch"]
    if progress["epoch_batches"] >= batches_per_epoch:  # the checkpoint closed its epoch
        epoch, progress = epoch + 1, {**progress, "epoch": epoch + 1, "epoch_batches": 0}
    try:
        while epoch <= trainer.epochs:
            epoch_start_step = progress["step"]
            sampler.set_epoch(epoch, start=progress["epoch_batches"] * trainer.batch_size)
            result = train_one_epoch(
                train_net, train_loader, optimizer, scheduler, loss_fn,
                device=device, mean=data.mean, std=data.std, step=progress["step"], epoch=epoch,
                max_steps=(batches_per_epoch - progress["epoch_batches"]) // accumulate, accumulate=accumulate,
                channels_last=trainer.channels_last, skip_nonfinite=trainer.skip_nonfinite, amp_dtype=amp_dtype,
                scaler=scaler, grad_clip_norm=trainer.grad_clip_norm, grad_norm_every=log_every if writer else 0,
                should_stop=shared_stop.poll, on_step=on_step, progress=main_rank,
            )  # fmt: skip
            progress = {**progress, "step": result.step, "epoch_batches": progress["epoch_batches"] + result.batches}
            if progress["epoch_batches"] < batches_per_epoch:  # stopped mid-epoch
                save(ckpt_dir / "last.pt", progress)
                distributed.barrier()  # no rank exits before rank 0 has saved
                raise TrainingInterrupted(shared_stop.requested or 0, ckpt_dir / "last.pt")
            metrics = None
            if epoch % trainer.val_every == 0 or epoch == trainer.epochs:
                distributed.broadcast_buffers(model)  # every rank scores the model rank 0 saves
                evaluation = evaluate(
                    net, val_loader,
                    num_classes=data.num_classes, ignore_index=data.ignore_index, device=device,
                    mean=data.mean, std=data.std, loss_fn=loss_fn, max_batches=trainer.limit_val_batches,
                    channels_last=trainer.channels_last, amp_dtype=amp_dtype, infer=infer, desc="val",
                    progress=main_rank,
                )  # fmt: skip
                evaluation = combine_ranks(evaluation)  # exact: integer confusion counts summed over ranks
                metrics = scores(evaluation.confusion, class_names)
                metrics["val_loss"] = evaluation.loss
                log.info(
                    "epoch %d/%d: train loss %.4f, val loss %.4f, val mIoU %.4f, pixel acc %.4f",
                    epoch, trainer.epochs, result.loss, evaluation.loss, metrics["miou"], metrics["pixel_acc"],
                )  # fmt: skip
                if writer is not None:
                    _log_validation(writer, progress["step"], metrics, evaluation.confusion, class_names, model)
                    _log_samples(
                        writer,
                        progress["step"],
                        net,
                        val_set,
                        sample_indices,
                        data,
                        device,
                        palette,
                        trainer.channels_last,
                        amp_dtype,
                    )
                if progress["best"] is None or metrics["miou"] > progress["best"]["miou"]:
                    best = {k: metrics[k] for k in METRIC_KEYS} | {
                        "epoch": epoch, "step": progress["step"], "checkpoint": str(ckpt_dir / "best.pt")
                    }  # fmt: skip
                    progress = {**progress, "best": best, "stale": 0}
                    save(ckpt_dir / "best.pt", progress, metrics)
                else:
                    progress = {**progress, "stale": progress.get("stale", 0) + 1}
            else:
                log.info("epoch %d/%d: train loss %.4f", epoch, trainer.epochs, result.loss)
            save(ckpt_dir / "last.pt", progress, metrics)
            if shared_stop.poll(progress["step"]) and epoch < trainer.epochs:  # also a signal during validation
                distributed.barrier()
                raise TrainingInterrupted(shared_stop.requested, ckpt_dir / "last.pt")
            patience = trainer.early_stopping_patience
            if patience and progress.get("stale", 0) >= patience:
                log.info("early stopping: val mIoU has not improved for %d validations", patience)
                break
            epoch += 1
            progress = {**progress, "epoch": epoch, "epoch_batches": 0}
    except NonFiniteLossError as exc:
        last = ckpt_dir / "last.pt"
        raise UserError(
            f"training loss became {exc.value} at step {exc.step} ({exc.consecutive} in a row); "
            f"last good checkpoint: {last if last.exists() else 'none yet'}. Lower optim.lr, check the data, "
            "or set trainer.skip_nonfinite=K to skip up to K bad steps in a row"
        ) from exc
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise UserError(_out_of_memory_message(cfg, device, amp_dtype)) from exc
    except RuntimeError as exc:
        if "out of memory" in str(exc) or "can't allocate memory" in str(exc):
            raise UserError(_out_of_memory_message(cfg, device, amp_dtype)) from exc
        raise
    finally:
        if writer is not None:
            writer.close()
    if main_rank and cfg.logger.tensorboard and progress["best"] is not None:
        _log_hparams(out_dir, cfg, progress["best"])
    return _report(progress["best"], out_dir, data, write=main_rank)


def _report(best: dict, out_dir: Path, data: DictConfig, write: bool = True) -> dict:
    # The best checkpoint's validation scores were computed with exactly its weights when it was
    # chosen (evaluation is deterministic), so they are reported as they are, not recomputed.
    # Its path is where it was written: a run resumed from another directory may not beat it.
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
    print(f"metrics: {out_dir / 'metrics.json'}\nTensorBoard: tensorboard --logdir {out_dir}")
    return report


def _find_resume_checkpoint(resume: str | None, ckpt_dir: Path) -> tuple[dict, Path] | None:
    """``resume=auto``: this run directory's newest good ``last.pt`` (or the one before it, or
    ``best.pt`` when no ``last.pt`` is left); ``resume=RUN_DIR``: the same in that directory;
    ``resume=PATH``: exactly that file (see :func:`fcn.rundir.resume_source`)."""
    if not resume:
        return None
    path, how = rundir.resume_source(str(resume), ckpt_dir.parent)  # [rrun]
    if how == "nothing":  # resume=auto in a directory with no checkpoint at all (a pinned new run)
        log.warning("resume=auto: no checkpoint in %s yet; starting fresh", ckpt_dir.resolve())
        return None
    if how == "last.pt":  # a run directory's: a corrupt one falls back to last.prev.pt
        return load_resumable(path)
    if how != "the given checkpoint":
        log.warning("resume=%s: %s", resume, how)
    return load_checkpoint(path), path


def _agreed_resume_checkpoint(resume: str | None, ckpt_dir: Path) -> tuple[dict, Path] | None:
    """:func:`_find_resume_checkpoint` as rank 0 sees it: every rank then loads the file rank 0
    chose (a corrupt ``last.pt`` falls back to the same ``last.prev.pt`` everywhere), or stops
    with rank 0's error. In a job the run directory must be visible to every rank."""
    found, error = None, None
    if distributed.is_main():
        try:
            found = _find_resume_checkpoint(resume, ckpt_dir)
        except UserError as exc:
            error = str(exc)
    source, error = distributed.broadcast_object((found[1] if found else None, error))
    if error is not None:
        raise UserError(error)
    if found is None and source is not None:
        found = load_checkpoint(source), Path(source)
    return found


def _check_same_run_shape(saved: dict, shape: dict, source: Path) -> None:
    """A resumed run continues the same schedule over the same batches; explain any difference."""
    names = {"batch_size": "trainer.batch_size", "batches_per_epoch": "batches per epoch (data, trainer.batch_size, "
             "trainer.limit_train_batches)", "total_steps": "schedule length (trainer.epochs)",
             "world_size": "processes (torchrun --nproc_per_node x nodes)",
             "accumulate_grad_batches": "trainer.accumulate_grad_batches"}  # fmt: skip
    older = {"world_size": 1, "accumulate_grad_batches": 1}  # checkpoints from before these settings existed
    saved = {**older, **saved}
    diffs = [f"{names[k]}: checkpoint {saved.get(k)}, now {v}" for k, v in shape.items() if saved.get(k) != v]
    if diffs:
        raise UserError(
            f"cannot resume {source} exactly: {'; '.join(diffs)}. Resume with the original settings, or start a "
            "new run from its weights with init_from=PATH"
        )


def _init_weights(model: torch.nn.Module, path: Path, model_config: dict) -> None:
    """``init_from``: weights only, from a checkpoint of the same backbone and width.

    Another class count or another variant is allowed: layers that the new model lacks are
    dropped, and layers that are new or whose shape differs (score layers and upsampling for
    another class count; the skip layers and the final upsampling of FCN-16s started from a
    32s checkpoint, the paper's staged training) keep their initialisation: zero score layers,
    bilinear upsampling, so new skips start as no-ops on top of what the checkpoint learned.
    """
    state = load_checkpoint(path)
    saved = state["config"]["model"]
    check_architecture(saved, model_config, path, allow=("num_classes", "variant", "scaled_skips"))
    weights, own = state["model"], model.state_dict()
    reset = sorted(k for k, v in weights.items() if k in own and own[k].shape != v.shape)
    new = sorted(k for k in own if k not in weights)
    unused = sorted(k for k in weights if k not in own)
    if saved["num_classes"] != model_config["num_classes"]:
        log.warning(
            "init_from %s: it has %d classes, this model %d; these layers start from their initialisation: %s",
            path, saved["num_classes"], model_config["num_classes"], ", ".join(reset),
        )  # fmt: skip
    elif reset:
        log.info("init_from %s: these layers differ in shape and start from their initialisation: %s",
                 path, ", ".join(reset))  # fmt: skip
    if saved["variant"] == model_config["variant"] and (new or unused):
        raise UserError(f"checkpoint {path} does not fit this model: missing {new[:3]}, unexpected {unused[:3]}")
    if saved["variant"] != model_config["variant"]:
        log.info(
            "init_from %s: FCN-%s weights into FCN-%s; new layers keep their initialisation: %s; unused: %s",
            path, saved["variant"], model_config["variant"], ", ".join(new) or "none", ", ".join(unused) or "none",
        )  # fmt: skip
    model.load_state_dict({k: v for k, v in weights.items() if k in own and k not in reset}, strict=False)
    log.info("initialised weights from %s (optimizer and schedule start fresh)", path)


def _out_of_memory_message(cfg: DictConfig, device: torch.device, amp_dtype: torch.dtype | None) -> str:
    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "float32"
    hint = "" if amp_dtype is not None or device.type != "cuda" else ", or trainer.precision=bf16"
    return (
        f"out of memory on {device} with trainer.batch_size={cfg.trainer.batch_size}, "
        f"data.crop_size={cfg.data.crop_size}, precision {precision}, "
        f"model {cfg.model.backbone}-fcn{cfg.model.variant}: "
        f"lower trainer.batch_size first, then data.crop_size (or model.width for the tiny backbone){hint}"
    )


def _make_writer(logger_cfg: DictConfig, out_dir: Path, purge_step: int | None):
    if not logger_cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step)


def _log_hparams(out_dir: Path, cfg: DictConfig, best: dict) -> None:
    """The run's main settings beside its best val mIoU, for TensorBoard's HPARAMS tab."""
    from torch.utils.tensorboard import SummaryWriter

    hparams = {
        "model": f"{cfg.model.backbone}-fcn{cfg.model.variant}",
        "width": cfg.model.width,
        "learnable_upsampling": str(cfg.model.learnable_upsampling),  # true, false or intermediate
        "scaled_skips": bool(cfg.model.get("scaled_skips", False)),
        "init_from": str(cfg.init_from or ""),  # staged training: which stage this one started from
        "optimizer": cfg.optim._target_.rsplit(".", 1)[-1],
        "lr": cfg.optim.lr,
        "batch_size": cfg.trainer.batch_size,
        "epochs": cfg.trainer.epochs,
        "data": cfg.data.name,
        "seed": cfg.seed,
    }
    with SummaryWriter(log_dir=str(out_dir / "tensorboard")) as writer:
        writer.add_hparams(hparams, {"hparam/best_val_miou": best["miou"]}, run_name=".")


def _log_validation(writer, step: int, metrics: dict, confusion: torch.Tensor, class_names, model) -> None:
    writer.add_scalar("val/loss", metrics["val_loss"], step)
    writer.add_scalar("val/mIoU", metrics["miou"], step)
    writer.add_scalar("val/pixel_acc", metrics["pixel_acc"], step)
    writer.add_scalar("val/mean_acc", metrics["mean_acc"], step)
    writer.add_scalar("val/fwIoU", metrics["fwiou"], step)
    for name, iou in metrics["per_class_iou"].items():
        if iou is not None:
            writer.add_scalar(f"val/IoU/{name}", iou, step)
    picture = np.asarray(confusion_image(confusion, class_names).convert("RGB"))
    writer.add_image("val/confusion_matrix", picture, step, dataformats="HWC")
    # How far each learned upsampling has moved from bilinear interpolation, and what it became.
    for name, drift in decoder_drift(model).items():
        writer.add_scalar(f"decoder/drift/{name}", drift, step)
    for name, kernel in decoder_kernels(model).items():
        writer.add_image(f"decoder/kernel/{name}", kernel, step)
    writer.add_scalar(
        "train/weight_norm", float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm()), step
    )


@torch.no_grad()
def _log_samples(writer, step, model, dataset, indices, data, device, palette, channels_last, amp_dtype) -> None:
    """The same few validation images at every validation: input, ground truth, prediction."""
    if len(indices) == 0:
        return
    images, masks = pad_collate([dataset[int(i)] for i in indices], data.ignore_index)
    model.eval()
    x = to_model_input(images, device, data.mean, data.std, channels_last)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        preds = model(x).argmax(1)
    writer.add_image("val/samples", comparison_grid(images, masks, preds, palette, data.ignore_index), step)


# ---- [rrun] run directories: claimed exclusively, never overwritten, removed when a command fails
# before writing anything of value, and resumed where they are (fcn/rundir.py holds the rules).
_CLAIMED: dict[str, str] = {}  # the run directory this process made: {path asked for: path made}
_MADE_BEFORE_HYDRA: set[str] = set()  # pinned run directories that did not exist before this command
_HYDRA_FILES_BEFORE: dict[Path, bytes] = {}  # a pinned existing run's .hydra/ files, put back if this command fails


def _claim_run_dir(path: str) -> str:
    """Resolver ``${fcn.claim_dir:PATH}`` (configs/train.yaml, ``hydra.run.dir``): make a new run
    directory atomically, ``PATH`` or ``PATH_1``, ... once per process, before Hydra writes into it."""
    if path not in _CLAIMED:
        _CLAIMED[path] = str(rundir.claim_run_dir(path).resolve())
    return _CLAIMED[path]


OmegaConf.register_new_resolver("fcn.claim_dir", _claim_run_dir, replace=True)


def _created_here(run_dir: Path) -> bool:
    """Whether this command made ``run_dir`` (so it may remove it again after a failure)."""
    return str(run_dir.resolve()) in set(_CLAIMED.values()) | _MADE_BEFORE_HYDRA


def _program() -> str:
    argv0 = Path(sys.argv[0])
    return f"python {sys.argv[0]}" if argv0.suffix == ".py" else argv0.name


def _move_file_logs(src: Path, dst: Path) -> None:
    """Point the log file handlers writing into ``src`` at the same file names in ``dst`` (appending)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == src.resolve():
            moved = logging.FileHandler(dst / Path(handler.baseFilename).name, mode="a")
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)


def _run_dir_to_resume(cfg: DictConfig, run_dir: Path) -> Path:
    """Without a pinned ``hydra.run.dir``, ``resume=auto`` continues the newest unfinished run of
    the same config under the outputs root, and ``resume=RUN_DIR`` continues that run, each in its
    own directory; the directory just made for this command is removed. Otherwise ``run_dir``."""
    if not cfg.resume or not _created_here(run_dir) or str(run_dir.resolve()) not in _CLAIMED.values():
        return run_dir
    if cfg.resume == "auto":
        config = OmegaConf.to_container(cfg, resolve=True)
        found = rundir.find_unfinished_runs(run_dir.parent, config, exclude=run_dir)
        if not found:
            raise UserError(
                f"resume=auto: no hydra.run.dir given and no unfinished run of this config under {run_dir.parent}; "
                "continue a run with resume=<its run directory>, or start a fresh run without resume="
            )
        target = found[0]
        log.warning("resume=auto: continuing the newest unfinished run of this config, %s", target)
    elif Path(cfg.resume).is_dir():
        target = Path(cfg.resume)
        rundir.resume_source(str(cfg.resume), target)  # a directory with no checkpoint: one line, here
    else:
        return run_dir  # resume=CHECKPOINT: a new run directory continues from it
    _move_file_logs(run_dir, target)
    rundir.remove_failed_run(run_dir)
    return target.resolve()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> float:
    """Hydra entry point of one process; returns the best val mIoU (for sweepers)."""
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir, lock, main_rank = hydra_dir, None, distributed.is_main()
    try:
        if main_rank:
            run_dir = _run_dir_to_resume(cfg, hydra_dir)
            lock = rundir.acquire_lock(run_dir)  # [rrun] one run per directory
        if main_rank and distributed.world_size() > 1:
            distributed.broadcast_object(str(run_dir))  # the other ranks wait for it in main(), before Hydra
        with GracefulStop() as stop:
            try:
                return train(cfg, run_dir, stop)["miou"]
            except TrainingInterrupted as exc:
                command = rundir.resume_command(_program(), list(HydraConfig.get().overrides.task), run_dir)
                log.warning("%s; saved %s. Resume with:\n  %s", exc, exc.checkpoint, command)
                sys.exit(128 + exc.signum)
    except BaseException as exc:
        # A command that fails before writing anything of value leaves no directory behind
        # (never one holding a checkpoint, never one it did not make).
        interrupted = isinstance(exc, SystemExit) and exc.code not in (None, 0, 2)
        if main_rank and not interrupted and _created_here(run_dir):
            rundir.remove_failed_run(run_dir)
        if main_rank and not interrupted and not _created_here(hydra_dir):
            for path, content in _HYDRA_FILES_BEFORE.items():  # the directory's config describes what ran
                if path.parent.parent.resolve() == hydra_dir.resolve():
                    path.write_bytes(content)
        raise
    finally:
        if lock is not None:
            rundir.release_lock(lock)


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
    _check_pinned_run_dir(argv)  # [rrun]
    if not distributed.launched_by_torchrun() or any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        hydra_main()
        return
    if any(a in ("-m", "--multirun") for a in argv):
        print("error: a sweep (-m) cannot run under torchrun; launch one torchrun per setting", file=sys.stderr)
        sys.exit(2)
    with distributed.process_group():
        if not distributed.is_main():
            sys.argv.extend(_other_rank_overrides(distributed.broadcast_object(None), distributed.rank()))
        hydra_main()


def _check_pinned_run_dir(argv: list[str]) -> None:
    """``hydra.run.dir=DIR`` on the command line: before Hydra writes ``.hydra/`` there, a fresh
    run refuses a directory holding checkpoints (one line, exit 2, nothing touched); a directory
    that does not exist yet is noted as made by this command."""
    pinned = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not pinned or any(a in ("-m", "--multirun") for a in argv):
        return
    run_dir = Path(pinned[-1].strip("'\"")).expanduser()
    if not run_dir.exists():
        _MADE_BEFORE_HYDRA.add(str(run_dir.resolve()))
    elif (run_dir / ".hydra").is_dir():  # Hydra rewrites them before our checks; a refused command puts them back
        _HYDRA_FILES_BEFORE.update({p: p.read_bytes() for p in (run_dir / ".hydra").glob("*.yaml")})
    resume = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("resume=")]
    if not resume or resume[-1] in ("", "null", "None"):
        try:
            rundir.refuse_fresh_start(run_dir)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)


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
