"""Run directories: claiming one, refusing to overwrite one, and resuming the right one.

A run directory holds one training run: ``.hydra/`` (the composed config), ``train.log``,
``checkpoints/`` (``last.pt``, ``last.prev.pt``, ``best.pt``), TensorBoard events and, once the
run has finished, ``metrics.json``. The rules kept here (plain arguments, no Hydra):

- **Claimed exclusively.** The default run directory is made with an atomic ``mkdir``
  (:func:`claim_run_dir`); a second job started in the same second gets ``<time>_1``, never the
  first job's directory. Any run directory, pinned or not, is also locked while a run uses it
  (:func:`acquire_lock`, an OS lock through filelock), so two jobs never write into one; a
  directory the user names is made and locked before anything writes there
  (:func:`claim_pinned_run_dir`).
- **Never overwritten.** A fresh run (no ``resume=``) refuses a directory that holds any
  checkpoint (:func:`refuse_fresh_start`).
- **Resume resumes.** ``resume=`` takes ``auto``, a checkpoint file or a run directory
  (:func:`resume_source`); a run directory without ``last.pt`` resumes from ``best.pt`` (it holds
  the same optimizer, schedule and random state as the ``last.pt`` saved with it) and says so.
  :func:`find_unfinished_runs` finds the newest interrupted run of the same config;
  :func:`resume_command` prints the command that continues a run.
- **Changed settings are checked** (:func:`compare_configs`): keys that cannot change what is
  learned (:data:`HARMLESS_KEYS`) are applied with a warning; every other key must be unchanged.
- **Failed commands leave nothing behind** (:func:`holds_results`, :func:`remove_failed_run`).
"""

from __future__ import annotations

import atexit
import errno
import os
import shlex
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from fcn.errors import UserError, write_error
from fcn.overrides import override

#: Files that make a run directory worth keeping.
CHECKPOINT_NAMES = ("last.pt", "last.prev.pt", "best.pt")
LOCK_NAME = ".run.lock"

#: Settings that cannot change what the model learns, step by step: loading speed, devices and
#: kernels (floating-point results may differ in the last bits, as on another machine), logging,
#: checkpoint frequency, and how validation is run and shown. A key equal to one of these, or
#: below one (``logger`` covers ``logger.num_images``), may change on resume; it is applied and
#: listed in a warning. Every other key (optimizer, lr, schedule, loss, model, data, crop, batch
#: size, seed, augmentation, epochs, precision, ...) changes the run's trajectory: a resume with
#: another value is refused. Keys absent on either side (settings added or removed since the
#: checkpoint was written) are not compared.
HARMLESS_KEYS = (
    "resume",  # not even listed: it differs on every resume
    "init_from",  # the resumed checkpoint's weights replace whatever init_from loaded
    "logger",
    "eval",
    "data.root",  # the same files, moved
    "data.scan",
    "data.generate",  # only used when data.root does not exist yet
    "data.split",  # the split evaluate.py scores, not one training reads
    "data.max_image_pixels",  # a limit that refuses images, never changes one
    "trainer.num_workers",
    "trainer.prefetch_factor",
    "trainer.pin_memory",
    "trainer.persistent_workers",
    "trainer.threads",
    "trainer.device",
    "trainer.channels_last",
    "trainer.compile",
    "trainer.deterministic",
    "trainer.checkpoint_every_n_steps",
    "trainer.limit_val_batches",
    "trainer.val_every",
    "trainer.early_stopping_patience",
)


def is_harmless(key: str) -> bool:
    """Whether dotted ``key`` (e.g. ``trainer.num_workers``) may change on resume (see :data:`HARMLESS_KEYS`)."""
    return any(key == k or key.startswith(k + ".") for k in HARMLESS_KEYS)


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
    the trajectory, ``applied`` keys that cannot (see :data:`HARMLESS_KEYS`).
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
        (changes.applied if is_harmless(key) else changes.refused).append(line)
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


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The checkpoint files of a run directory (``checkpoints/*.pt``, sorted by name); [] when none."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    return sorted(ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []


def refuse_fresh_start(run_dir: Path) -> None:
    """A fresh run (no ``resume=``) never writes into a directory that holds a checkpoint.

    Raises :class:`UserError` naming the files and both ways on: continue that run, or choose
    another directory.
    """
    found = checkpoints_in(run_dir)
    if found:
        raise UserError(
            f"run directory {run_dir} already holds checkpoints ({', '.join(p.name for p in found)}); "
            f"a fresh run would overwrite them: continue it with resume=auto {override('hydra.run.dir', run_dir)}, "
            "or choose another directory (hydra.run.dir=...)"
        )


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
    if not ckpt_dir.is_dir() and any((directory / n).is_file() for n in CHECKPOINT_NAMES):
        ckpt_dir = directory  # resume=<run>/checkpoints
    last, prev, best = (ckpt_dir / n for n in CHECKPOINT_NAMES)
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
            f"resume={resume}: no resumable checkpoint in {ckpt_dir} (looked for {', '.join(CHECKPOINT_NAMES)}"
            + (f"; found {', '.join(others)}: give one as resume=PATH" if others else "")
            + ")"
        )
    return last, "nothing"


def is_unfinished(run_dir: Path) -> bool:
    """A run that saved a resumable checkpoint and has not written ``metrics.json`` (its end)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    has_checkpoint = any((ckpt_dir / n).is_file() for n in CHECKPOINT_NAMES)
    return has_checkpoint and not (Path(run_dir) / "metrics.json").is_file()


def stored_config(run_dir: Path) -> dict | None:
    """The config stored in a run's newest checkpoint (``last.pt``, ``last.prev.pt``, ``best.pt``),
    or None when none is readable. Memory-mapped: the tensors are not read."""
    import torch

    for name in CHECKPOINT_NAMES:
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
    :data:`HARMLESS_KEYS`. ``read_config(run_dir)`` gives a run's config (default: the one its
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
    return max((p.stat().st_mtime for p in checkpoints_in(run_dir)), default=0.0)


def resume_command(program: str, overrides: list[str], run_dir: Path) -> str:
    """The shell command that continues the run in ``run_dir``.

    ``overrides`` are the original command line's overrides; ``resume=`` and ``hydra.run.dir=``
    among them are replaced by ``resume=auto hydra.run.dir=<run_dir>``. Each word is quoted for
    a POSIX shell.
    """
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    # the original overrides are passed back as Hydra received them; the run directory is quoted for Hydra too
    return " ".join([program, *(shlex.quote(w) for w in [*kept, "resume=auto"]), override("hydra.run.dir", run_dir)])


def claim_run_dir(path: str | Path, attempts: int = 1000) -> Path:
    """Create a new run directory atomically: ``path``, else ``path_1``, ``path_2``, ...

    ``mkdir`` fails when the directory exists, also when another process made it a moment ago,
    so two jobs started in the same second get two directories. Parents are created as needed.
    Raises :class:`UserError` when none of ``attempts`` names is free or the parent is not writable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(attempts):
        candidate = path if n == 0 else path.with_name(f"{path.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except PermissionError as exc:
            raise UserError(f"cannot create run directory {candidate}: {exc.strerror}") from exc
        return candidate
    raise UserError(f"cannot claim a run directory: {path} and {attempts - 1} suffixed names exist")


def claim_pinned_run_dir(run_dir: Path) -> bool:
    """Make ``run_dir`` (a directory the user named; parents too) and lock it until this process exits
    (:func:`acquire_lock`), before anything writes there. Returns whether it was made here. At exit the
    lock is given back, and the directories made here are removed while empty (the command ended
    before writing there: a mistyped key, a refused value). Raises :class:`UserError` when another run
    holds it, or it cannot be made or locked (one line naming the lock file).
    """
    run_dir = Path(run_dir)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        note = "nothing in it was changed"
        raise write_error(exc, path=run_dir / LOCK_NAME, note=note) or UserError(str(exc)) from exc
    atexit.register(_remove_if_unused, made, acquire_lock(run_dir))
    return bool(made)


def _remove_if_unused(made: list[Path], lock: Path) -> None:
    release_lock(lock)
    for directory in made:
        try:
            directory.rmdir()  # only an empty directory: never one holding a file
        except FileNotFoundError:
            continue  # removed already (a run that failed inside Hydra cleans up its own directory)
        except OSError:
            return


def acquire_lock(run_dir: Path) -> Path:
    """Lock ``run_dir`` for this process: an OS lock (``flock``, via :mod:`filelock`) on ``.run.lock``.

    The operating system holds the lock, so it ends with its process however that ends (killed,
    crashed, a node lost): a killed run's lock is free by construction, and of two starts racing for
    it exactly one wins. Its holder writes host, pid and SLURM job into the file, for the message
    the others get. Re-entrant within a process (taken before Hydra for a pinned directory). Returns
    the lock file (give it back with :func:`release_lock`). Raises :class:`UserError` when another
    process holds it, or the lock file cannot be written (a full disk, a read-only directory).
    """
    lock = Path(run_dir) / LOCK_NAME
    key = str(lock.resolve())
    if key in _HELD:
        return lock
    held = FileLock(lock, timeout=0)
    try:
        held.acquire()
        with open(lock, "r+") as f:  # the holder's record, for the message another start gets
            f.write(f"{socket.gethostname()} {os.getpid()} {os.environ.get('SLURM_JOB_ID', '-')}\n")
            f.truncate()
    except Timeout:
        holder = _current_holder(lock)
        who = f"process {holder[1]} on {holder[0]}" if holder else "another process"
        raise UserError(
            f"run directory {run_dir} is in use by {who} (lock file {lock}); wait for that run, choose "
            "another directory, or delete the lock file if that run is no longer running"
        ) from None
    except OSError as exc:  # a full disk, a read-only run directory...: one line naming the lock
        if held.is_locked:
            held.release(force=True)
        raise write_error(exc, path=lock, note="nothing in the run directory was changed") or exc from exc
    _HELD[key] = held
    return lock


def release_lock(lock: Path) -> None:
    """Give back a lock taken by :func:`acquire_lock`, removing its file while still holding it (filelock
    grants no lock on a removed file). Nothing happens when this process does not hold it."""
    held = _HELD.pop(str(Path(lock).resolve()), None)
    if held is not None:
        Path(lock).unlink(missing_ok=True)
        held.release(force=True)


_HELD: dict[str, FileLock] = {}  # the locks this process holds: {resolved lock file: its filelock}


def _current_holder(lock: Path) -> tuple[str, int] | None:
    """The ``(host, pid)`` the lock file names. A killed holder's record stays until the process that
    took the lock over writes its own, a moment later: a record naming a process of this host that no
    longer runs is read again for up to a second, then left unsaid."""
    for _ in range(20):
        try:
            host, pid, *_ = lock.read_text().split()
            if host != socket.gethostname() or _alive(int(pid)):
                return host, int(pid)
        except (OSError, ValueError):
            pass  # not written yet, or not by fcn
        time.sleep(0.05)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    return True


def holds_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything of value: a checkpoint or ``metrics.json``."""
    return bool(checkpoints_in(run_dir)) or (Path(run_dir) / "metrics.json").is_file()


def remove_failed_run(run_dir: Path) -> bool:
    """Remove a run directory this process created, after a failure before anything of value.

    Only ``.hydra/``, ``train.log``, the lock file and TensorBoard events without any checkpoint
    are removed; a directory holding a checkpoint, ``metrics.json`` or any other file is kept.
    Returns whether it was removed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or holds_results(run_dir):
        return False
    expected = {".hydra", "train.log", LOCK_NAME, "tensorboard", "checkpoints"}
    if any(p.name not in expected for p in run_dir.iterdir()):
        return False
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        return False  # a partial save or a file someone put there: not ours to judge
    try:
        shutil.rmtree(run_dir)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            return False
    return True
