"""Continuing a run: which checkpoint to resume (agreed by every rank), whether the run still has
its shape, restoring the training state from it, and ``init_from`` (weights only).

Plain arguments; the messages name the settings (``resume``, ``init_from``, ``trainer.*``) a user
changes to fix them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fcn import distributed, rundir
from fcn.checkpoint import check_architecture, check_writable, load_checkpoint, load_resumable
from fcn.errors import UserError
from fcn.rng import restore_rng_state
from fcn.state_dict import match_keys, mismatch

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


# What each part of a run's shape is called on the command line (for the resume error).
SHAPE_NAMES = {
    "batch_size": "trainer.batch_size",
    "batches_per_epoch": "batches per epoch (data, trainer.batch_size, trainer.limit_train_batches)",
    "total_steps": "schedule length in optimisation steps (trainer.epochs x steps per epoch)",
    "world_size": "processes (torchrun --nproc_per_node x nodes)",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
}


def find_resume_checkpoint(resume: str | None, ckpt_dir: Path) -> tuple[dict, Path] | None:
    """The checkpoint ``resume=`` names, loaded: ``(state, path)``, or None to start fresh.

    ``auto``: this run directory's (``ckpt_dir.parent``) newest good ``last.pt`` (or the one
    before it, or ``best.pt`` when no ``last.pt`` is left); a run directory: the same in that
    directory; a checkpoint file: exactly that file; None or empty: nothing. ``auto`` in a
    directory with no checkpoint at all (a pinned new run) starts fresh with a warning. Raises
    :class:`UserError` naming ``resume=`` (see :func:`fcn.rundir.resume_source`).
    """
    if not resume:
        return None
    for name in rundir.CHECKPOINT_NAMES:  # before training: a save that cannot happen would lose an epoch
        check_writable(ckpt_dir / name)
    path, how = rundir.resume_source(str(resume), ckpt_dir.parent)
    if how == "nothing":
        log.warning("resume=auto: no checkpoint in %s yet; starting fresh", ckpt_dir.resolve())
        return None
    if how == "last.pt":  # a run directory's: a corrupt one falls back to last.prev.pt
        return load_resumable(path)
    if how != "the given checkpoint":
        log.warning("resume=%s: %s", resume, how)
    return load_checkpoint(path, key="resume"), path


def agreed_resume_checkpoint(resume: str | None, ckpt_dir: Path) -> tuple[dict, Path] | None:
    """:func:`find_resume_checkpoint` as rank 0 sees it: every rank then loads the file rank 0
    chose (a corrupt ``last.pt`` falls back to the same ``last.prev.pt`` everywhere), or stops
    with rank 0's error. In a job the run directory must be visible to every rank."""
    found, error = None, None
    if distributed.is_main():
        try:
            found = find_resume_checkpoint(resume, ckpt_dir)
        except UserError as exc:
            error = str(exc)
    source, error = distributed.broadcast_object((found[1] if found else None, error))
    if error is not None:
        raise UserError(error)
    if found is None and source is not None:
        found = load_checkpoint(source, key="resume"), Path(source)
    return found


def check_same_run_shape(saved: dict, shape: dict, source: Path) -> None:
    """A resumed run continues the same schedule over the same batches; explain any difference.

    ``saved`` is the checkpoint's ``progress``, ``shape`` this run's values of :data:`SHAPE_NAMES`.
    Raises :class:`UserError` naming every setting that differs.
    """
    older = {"world_size": 1, "accumulate_grad_batches": 1}  # checkpoints from before these settings existed
    saved = {**older, **saved}
    diffs = [f"{SHAPE_NAMES[k]}: checkpoint {saved.get(k)}, now {v}" for k, v in shape.items() if saved.get(k) != v]
    if diffs:
        raise UserError(
            f"cannot resume {source} exactly: {'; '.join(diffs)}. Resume with the original settings, or start a "
            "new run from its weights with init_from=PATH"
        )


def restore_training_state(
    state: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    rank: int,
) -> dict:
    """Load a checkpoint's weights, optimiser, schedule, scaler and this rank's random state in
    place; returns its ``progress`` dict (where training stands)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # Each rank resumes its own dropout masks; a checkpoint of one process has one state for all.
    rng_states = state.get("rng_by_rank") or [state["rng"]]
    restore_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return checked_best(state["progress"])


def checked_best(progress: dict) -> dict:
    """``progress`` with its best checkpoint verified (digest, finite weights: :func:`load_checkpoint`).

    The best val mIoU recorded in ``last.pt`` is what later validations must beat; a damaged or
    missing ``best.pt`` must not stay the run's result. It is renamed ``best.damaged.pt`` (kept for
    inspection, read by nothing) and the record dropped, so the next validation writes a new
    ``best.pt``. Raises :class:`UserError` when the run has no validation left to write one.
    """
    best = progress.get("best")
    if not best or not best.get("checkpoint"):
        return progress
    path = Path(best["checkpoint"])
    try:
        load_checkpoint(path, key="resume")
    except UserError as exc:
        problem = str(exc)
    else:
        return progress
    if path.is_file() and distributed.is_main():
        path.replace(path.with_name(path.stem + ".damaged" + path.suffix))
    if progress.get("step", 0) >= progress.get("total_steps", float("inf")):
        raise UserError(
            f"{problem}. The run has finished, so no new best checkpoint can be written: evaluate its last.pt "
            f"(checkpoint={path.with_name('last.pt')}) or train on from it with init_from=PATH"
        )
    log.warning("%s; the run's best checkpoint is not trusted: the next validation writes a new best.pt", problem)
    return {**progress, "best": None, "stale": 0}


def init_weights(model: torch.nn.Module, path: Path, model_config: dict) -> None:
    """``init_from``: weights only, from a checkpoint of the same backbone and width.

    Another class count or another variant is allowed: layers that the new model lacks are
    dropped, and layers that are new or whose shape differs (score layers and upsampling for
    another class count; the skip layers and the final upsampling of FCN-16s started from a
    32s checkpoint, the paper's staged training) keep their initialisation: zero score layers,
    bilinear upsampling, so new skips start as no-ops on top of what the checkpoint learned.
    Raises :class:`UserError` when the checkpoint's architecture does not fit.
    """
    state = load_checkpoint(path, key="init_from")
    saved = state["config"]["model"]
    check_architecture(saved, model_config, path, allow=("num_classes", "variant", "scaled_skips"))
    weights, own = match_keys(state["model"], model, f"init_from={path}"), model.state_dict()
    reset = sorted(k for k, v in weights.items() if k in own and own[k].shape != v.shape)
    new = sorted(k for k in own if k not in weights)
    unused = sorted(k for k in weights if k not in own)
    if saved["num_classes"] != model_config["num_classes"]:
        log.warning(
            "init_from %s: it has %d classes, this model %d; these layers start from their initialisation: %s",
            path,
            saved["num_classes"],
            model_config["num_classes"],
            ", ".join(reset),
        )
    elif reset:
        reset_names = ", ".join(reset)
        log.info(
            "init_from %s: these layers differ in shape and start from their initialisation: %s", path, reset_names
        )
    if saved["variant"] == model_config["variant"] and (new or unused):
        raise UserError(f"init_from={path} does not fit this model: {mismatch(own, weights)}")
    if saved["variant"] != model_config["variant"]:
        log.info(
            "init_from %s: FCN-%s weights into FCN-%s; new layers keep their initialisation: %s; unused: %s",
            path,
            saved["variant"],
            model_config["variant"],
            ", ".join(new) or "none",
            ", ".join(unused) or "none",
        )
    model.load_state_dict({k: v for k, v in weights.items() if k in own and k not in reset}, strict=False)
    log.info("initialised weights from %s (optimizer and schedule start fresh)", path)
