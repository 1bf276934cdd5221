"""Run directories: claiming one, locking it, refusing to overwrite one.

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
- **Failed commands leave nothing behind** (:func:`holds_results`, :func:`remove_failed_run`).

Which checkpoint a resume continues, and which changed settings it refuses, is :mod:`fcn.resume`.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

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
