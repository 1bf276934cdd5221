"""Continuing a run, owned here from the source to the restored state, and ``init_from`` (weights only).

- **Which source** (:func:`resume_source`): ``resume=auto`` (this run directory's checkpoints), a
  run directory, or a checkpoint file; :func:`find_unfinished_runs` finds the newest interrupted
  run of the same config; :func:`resume_command` prints the command that continues a run.
- **Which checkpoint, agreed by every rank** (:func:`agreed_resume_checkpoint`): rank 0 picks it (a
  corrupt ``last.pt`` falls back to ``last.prev.pt``), every rank loads the same file.
- **Which changed settings are refused** (:func:`check_resume_config`): keys that cannot change
  what is learned (:func:`fcn.config.may_change_on_resume`) are applied with a warning; every other key, and the
  run's shape (:func:`check_same_run_shape`), must be unchanged.
- **Restore** (:func:`resume_training`): weights, optimiser, schedule, scaler, EMA, random state
  and progress. The run's best checkpoint is the ``best.pt`` beside the checkpoint resumed from
  (``<run>/checkpoints/best.pt``), whatever path was recorded when it was saved: a moved or
  copied run directory resumes as itself and never reads, checks or renames another run's files.

Plain arguments; the messages name the settings (``resume``, ``init_from``, ``trainer.*``) a user
changes to fix them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from fcn import distributed, rundir
from fcn.checkpoint import check_architecture, check_writable, load_checkpoint, load_resumable
from fcn.config import may_change_on_resume
from fcn.errors import UserError
from fcn.metrics import METRICS
from fcn.overrides import override
from fcn.rng import restore_rng_state
from fcn.state_dict import match_keys, mismatch

log = logging.getLogger(__name__)

# The validation scores kept for the best checkpoint (and reported at the end): every score of the
# metrics table, and the per-class IoU.
METRIC_KEYS = (*METRICS, "per_class_iou")


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


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are leaves (compared whole)."""
    if not isinstance(config, dict) or (prefix and not config):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@dataclass
class ConfigChanges:
    """Keys whose value differs between a checkpoint's config and the current one.

    Each entry is a line ``key: checkpoint VALUE, now VALUE``. ``refused`` holds keys that change
    the trajectory, ``applied`` keys that cannot (see :func:`fcn.config.may_change_on_resume`).
    """

    refused: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)


def compare_configs(saved: dict, now: dict) -> ConfigChanges:
    """Compare two plain config dicts key by key (dotted leaves), sorted by key."""
    old, new = flatten(saved), flatten(now)
    changes = ConfigChanges()
    changed = {key: (old[key], new[key]) for key in old.keys() & new.keys() if not _same(old[key], new[key])}
    # A key on one side only is a setting added or removed by another version of the code (data.X:
    # not compared), or an entry of a mapping-valued setting (data.label_map: null -> {1: 0}, or a
    # label added to it): that setting is compared whole.
    for key in old.keys() ^ new.keys():
        parts = key.split(".")
        for depth in range(2, len(parts)):
            setting = ".".join(parts[:depth])
            before, after = _value_at(saved, setting), _value_at(now, setting)
            if before is not _MISSING and after is not _MISSING:
                changed[setting] = (before, after)
                break
    for key in sorted(changed):
        if key == "resume":
            continue
        line = f"{key}: checkpoint {changed[key][0]!r}, now {changed[key][1]!r}"
        (changes.applied if may_change_on_resume(key) else changes.refused).append(line)
    return changes


_MISSING = object()


def _value_at(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return _MISSING
        config = config[part]
    return config


def _same(a: Any, b: Any) -> bool:
    # YAML and the command line may turn 1 into 1.0: the same value. True == 1 in Python: not the same setting.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def check_resume_config(saved: dict, now: dict, source: Path) -> list[str]:
    """Refuse a resume whose settings would change the run's trajectory.

    ``saved`` is the checkpoint's stored config, ``now`` the resumed run's resolved config (both
    plain dicts). Returns the lines of harmless changes (the caller warns with them; the new
    values apply and later checkpoints store them). Raises :class:`UserError` with one line per
    refused key and the two ways on: drop the overrides, or ``init_from=<checkpoint>``.
    """
    changes = compare_configs(saved, now)
    if changes.refused:
        lines = "\n  ".join(changes.refused)
        raise UserError(
            f"cannot resume {source} with changed settings (they change what is learned):\n  {lines}\n"
            f"drop these overrides to continue the run as it was, or start a new run from its weights "
            f"with init_from={source} (optimizer and schedule start fresh)"
        )
    return changes.applied


def resume_source(resume: str, run_dir: Path) -> tuple[Path, str]:
    """Where ``resume=`` points: ``(checkpoint path, how it was found)``.

    ``resume``: ``auto`` (``run_dir``'s own checkpoints), a run directory, or a checkpoint file.
    For a directory, ``checkpoints/last.pt`` is returned (the caller falls back to
    ``last.prev.pt`` when it is corrupt); when only ``best.pt`` is left, it is returned and the
    note says so. ``auto`` in a directory with no checkpoint returns ``run_dir/checkpoints/last.pt``
    (which does not exist: the caller starts fresh). Raises :class:`UserError` naming
    ``resume=`` for a path that does not exist or a directory with no checkpoint.
    """
    if resume == "auto":
        directory = Path(run_dir)
    else:
        path = Path(resume).expanduser()
        if not path.exists():
            raise UserError(
                f"resume={resume}: not found; give a checkpoint file, a run directory, or resume=auto "
                "with hydra.run.dir=<run directory>"
            )
        if path.is_file():
            return path, "the given checkpoint"
        directory = path
    ckpt_dir = directory / "checkpoints"
    if not ckpt_dir.is_dir() and any((directory / n).is_file() for n in rundir.CHECKPOINT_NAMES):
        ckpt_dir = directory  # resume=<run>/checkpoints
    last, prev, best = (ckpt_dir / n for n in rundir.CHECKPOINT_NAMES)
    if last.is_file() or prev.is_file():
        return last, "last.pt"
    if best.is_file():
        others = [p.name for p in sorted(ckpt_dir.glob("*.pt"))]
        return best, (
            f"only {', '.join(others)} found in {ckpt_dir} (no last.pt): resuming from best.pt, "
            "the epochs trained after it are trained again"
        )
    others = [p.name for p in sorted(ckpt_dir.glob("*.pt"))] if ckpt_dir.is_dir() else []
    if resume != "auto" or others:  # never a fresh start over files that may be checkpoints
        raise UserError(
            f"resume={resume}: no resumable checkpoint in {ckpt_dir} (looked for {', '.join(rundir.CHECKPOINT_NAMES)}"
            + (f"; found {', '.join(others)}: give one as resume=PATH" if others else "")
            + ")"
        )
    return last, "nothing"


def is_unfinished(run_dir: Path) -> bool:
    """A run that saved a resumable checkpoint and has not finished: no ``metrics.json``, or one a
    stopped run wrote (its ``status`` is not ``finished``)."""
    ckpt_dir, metrics = Path(run_dir) / "checkpoints", Path(run_dir) / "metrics.json"
    if not any((ckpt_dir / n).is_file() for n in rundir.CHECKPOINT_NAMES):
        return False
    try:
        return json.loads(metrics.read_text()).get("status", "finished") != "finished"
    except (OSError, ValueError, AttributeError):  # none yet (or unreadable): not finished
        return True


def stored_config(run_dir: Path) -> dict | None:
    """The config stored in a run's newest checkpoint (``last.pt``, ``last.prev.pt``, ``best.pt``),
    or None when none is readable. Memory-mapped: the tensors are not read."""
    for name in rundir.CHECKPOINT_NAMES:
        path = Path(run_dir) / "checkpoints" / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - unreadable: try the next one; resuming reports it properly
            continue
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            return state["config"]
    return None


def find_unfinished_runs(
    outputs_root: Path, config: dict, exclude: Path | None = None, read_config=stored_config
) -> list[Path]:
    """Unfinished runs (:func:`is_unfinished`) under ``outputs_root`` whose stored config matches ``config``.

    ``config`` is the current run's resolved config as a plain dict; the match ignores
    :func:`fcn.config.may_change_on_resume`. ``read_config(run_dir)`` gives a run's config (default: the one its
    checkpoint stores, which describes what ran; ``.hydra/config.yaml`` is rewritten by every
    command pointed at the directory). Newest first (by the time its checkpoints were written);
    ``exclude`` (the directory just made for this command) is skipped.
    """
    root = Path(outputs_root)
    if not root.is_dir():
        return []
    found = []
    for run in root.iterdir():
        if not run.is_dir() or (exclude is not None and run.resolve() == Path(exclude).resolve()):
            continue
        if not is_unfinished(run):
            continue
        saved = read_config(run)
        if isinstance(saved, dict) and not compare_configs(saved, config).refused:
            found.append(run)
    return sorted(found, key=_last_written, reverse=True)


def _last_written(run_dir: Path) -> float:
    return max((p.stat().st_mtime for p in rundir.checkpoints_in(run_dir)), default=0.0)


def resume_command(program: str, overrides: list[str], run_dir: Path) -> str:
    """The shell command that continues the run in ``run_dir``.

    ``overrides`` are the original command line's overrides; ``resume=`` and ``hydra.run.dir=``
    among them are replaced by ``resume=auto hydra.run.dir=<run_dir>``. Each word is quoted for
    a POSIX shell.
    """
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    # the original overrides are passed back as Hydra received them; the run directory is quoted for Hydra too
    return " ".join([program, *(shlex.quote(w) for w in [*kept, "resume=auto"]), override("hydra.run.dir", run_dir)])


def find_resume_checkpoint(resume: str | None, ckpt_dir: Path) -> tuple[dict, Path] | None:
    """The checkpoint ``resume=`` names, loaded: ``(state, path)``, or None to start fresh.

    ``auto``: this run directory's (``ckpt_dir.parent``) newest good ``last.pt`` (or the one
    before it, or ``best.pt`` when no ``last.pt`` is left); a run directory: the same in that
    directory; a checkpoint file: exactly that file; None or empty: nothing. ``auto`` in a
    directory with no checkpoint at all (a pinned new run) starts fresh with a warning. Raises
    :class:`UserError` naming ``resume=`` (see :func:`resume_source`).
    """
    if not resume:
        return None
    for name in rundir.CHECKPOINT_NAMES:  # before training: a save that cannot happen would lose an epoch
        check_writable(ckpt_dir / name)
    path, how = resume_source(str(resume), ckpt_dir.parent)
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


def resume_training(
    resume: str | None,
    run_dir: Path,
    config: dict,
    shape: RunShape,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    ema: AveragedModel | None,
) -> TrainState | None:
    """Continue the run ``resume=`` names into ``run_dir``: the training state, or None to start fresh.

    The checkpoint is the one every rank agrees on (:func:`agreed_resume_checkpoint`); its model
    must have this ``config``'s architecture, its run this ``shape`` (:func:`check_same_run_shape`),
    and every other changed setting must be harmless (:func:`check_resume_config`: applied and
    listed in a warning). Then the weights, optimiser, schedule, ``scaler``, ``ema`` and this rank's
    random state are loaded in place, and the best checkpoint is verified where it lies now
    (:func:`checked_best`). Raises :class:`UserError` naming what to change.
    """
    found = agreed_resume_checkpoint(resume, Path(run_dir) / "checkpoints")
    if found is None:
        return None
    saved, source = found
    check_architecture(saved["config"]["model"], config["model"], source)
    check_same_run_shape(saved["progress"], dataclasses.asdict(shape), source)
    if applied := check_resume_config(saved["config"], config, source):
        log.warning(
            "resuming %s with changed settings that do not change what is learned: %s", source, "; ".join(applied)
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    # Each rank resumes its own dropout masks; a checkpoint of one process has one state for all.
    rng_states, rank = saved.get("rng_by_rank") or [saved["rng"]], distributed.rank()
    restore_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    if ema is not None and saved.get("ema") is not None:
        ema.load_state_dict(saved["ema"])  # else it starts from the resumed weights
    # The best checkpoint sits beside the one resumed (a moved or copied run's own best.pt), whatever
    # path was recorded; only one inside this run directory is ever set aside.
    best = source.parent / "best.pt"
    own = best.resolve().is_relative_to(Path(run_dir).resolve())
    state = TrainState.from_progress(checked_best(saved["progress"], best, set_aside=own))
    log.info("resumed from %s at epoch %d, batch %d, step %d", source, state.epoch, state.epoch_batches, state.step)
    if state.step >= shape.total_steps:  # nothing left to train: say so rather than look like a run
        log.warning(
            "%s is a finished run (step %d of %d, trainer.epochs=%d): nothing to train; its best checkpoint's "
            "scores follow. To train on, start a new run from it with init_from=%s",
            source,
            state.step,
            shape.total_steps,
            shape.total_steps // shape.steps_per_epoch,
            source,
        )
    return state


def checked_best(progress: dict, path: Path, set_aside: bool = True) -> dict:
    """``progress`` with its best checkpoint verified at ``path`` (digest, finite weights: :func:`load_checkpoint`).

    ``path`` is where the run's ``best.pt`` is now (the recorded path may name the directory the run
    was copied or moved from): the record is pointed at it. The best val mIoU recorded in
    ``last.pt`` is what later validations must beat; a damaged or missing ``best.pt`` must not stay
    the run's result. It is renamed ``best.damaged.pt`` (kept for inspection, read by nothing; only
    when ``set_aside``, by rank 0) and the record dropped, so the next validation writes a new
    ``best.pt``. Raises :class:`UserError` when the run has no validation left to write one.
    """
    best = progress.get("best")
    if not best or not best.get("checkpoint"):
        return progress
    path = Path(path)
    try:
        load_checkpoint(path, key="resume")
    except UserError as exc:
        problem = str(exc)
    else:
        return {**progress, "best": {**best, "checkpoint": str(path)}}
    if set_aside and path.is_file() and distributed.is_main():
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
