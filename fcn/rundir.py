"""Run directories: claiming one, locking it, refusing to overwrite one.

A run directory holds one training run: ``.hydra/`` (the composed config), ``train.log``,
``checkpoints/`` (``last.pt``, ``last.prev.pt``, ``best.pt``), TensorBoard events and, once the
run has finished, ``metrics.json``. The rules kept here (plain arguments, no Hydra):

- **Claimed exclusively.** The default run directory is made with an atomic ``mkdir``
  (:func:`claim_run_dir`); a second job started in the same second gets ``<time>_1``, never the
  first job's directory. Any run directory, pinned or not, is also locked while a run uses it
  (:func:`acquire_lock`), so two jobs never write into one.
- **Never overwritten.** A fresh run (no ``resume=``) refuses a directory that holds any
  checkpoint (:func:`refuse_fresh_start`).
- **Failed commands leave nothing behind** (:func:`holds_results`, :func:`remove_failed_run`).

Which checkpoint a resume continues, and which changed settings it refuses, is :mod:`fcn.resume`.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

from fcn.errors import UserError, write_error
from fcn.overrides import override

#: Files that make a run directory worth keeping.
CHECKPOINT_NAMES = ("last.pt", "last.prev.pt", "best.pt")
LOCK_NAME = ".run.lock"


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


def acquire_lock(run_dir: Path) -> Path:
    """Lock ``run_dir`` for this process (an ``O_EXCL`` file ``.run.lock`` holding host and pid).

    A lock left by a process of this host that no longer runs (killed) is taken over, and so is
    one left by an earlier run of this same SLURM job (``SLURM_JOB_ID`` is kept across a requeue,
    and SLURM runs one instance of a job at a time, so that holder is gone whichever node it was
    on). Returns the lock file (remove it with :func:`release_lock`). Raises :class:`UserError`
    when another live process, or one on another host, holds it.
    """
    lock = Path(run_dir) / LOCK_NAME
    me = f"{socket.gethostname()} {os.getpid()} {os.environ.get('SLURM_JOB_ID', '-')}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder == (socket.gethostname(), os.getpid()):
                return lock  # this process took it already (before Hydra, for a pinned directory)
            if holder is None or not _stale(*holder, lock):
                who = f"process {holder[1]} on {holder[0]}" if holder else "another process"
                raise UserError(
                    f"run directory {run_dir} is in use by {who} (lock file {lock}); wait for that run, choose "
                    "another directory, or delete the lock file if that run is no longer running"
                ) from None
            lock.unlink(missing_ok=True)  # the holder was killed: take over
            continue
        except OSError as exc:  # a full disk, a read-only run directory...: one line naming the lock
            raise write_error(exc, path=lock, note="nothing in the run directory was changed") or exc from exc
        try:
            with os.fdopen(fd, "w") as f:
                f.write(me)
        except OSError as exc:
            lock.unlink(missing_ok=True)
            raise write_error(exc, path=lock, note="nothing in the run directory was changed") or exc from exc
        return lock
    raise UserError(f"could not lock run directory {run_dir}: {lock} keeps reappearing")


def release_lock(lock: Path) -> None:
    """Remove a lock made by :func:`acquire_lock` (only if this process still holds it)."""
    holder = _lock_holder(lock)
    if holder is not None and holder == (socket.gethostname(), os.getpid()):
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> tuple[str, int] | None:
    try:
        host, pid, *_ = lock.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _lock_job(lock: Path) -> str | None:
    try:
        fields = lock.read_text().split()
    except OSError:
        return None
    return fields[2] if len(fields) > 2 and fields[2] != "-" else None


def _stale(host: str, pid: int, lock: Path) -> bool:
    job = _lock_job(lock)
    if job is not None and job == os.environ.get("SLURM_JOB_ID") and (host, pid) != (socket.gethostname(), os.getpid()):
        return True  # an earlier run of this requeued SLURM job
    if host != socket.gethostname():
        return False  # cannot tell: the other host may still run it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


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
