"""The one-line error exit of every entry point: a user's mistake ends with one clear line and
exit code 2, anything else keeps its traceback."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

from fcn.errors import UserError, write_error

log = logging.getLogger(__name__)

_STARTED = time.time()  # a run directory whose .hydra/ is older was not made by this command


def exit_on_user_error(task: Callable) -> Callable:
    """Run ``task``; a :class:`UserError` or a missing mandatory setting ends it with one line.

    The message goes to stderr and the log file; the exit code is 2. Anything else is a bug and
    keeps its traceback.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            from fcn.environment import check_torchvision

            check_torchvision()  # torch and torchvision that do not match: one line, before anything runs
            return task(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised below unless it is the user's mistake
            # an error of the OS on a write (full disk, ulimit -f, read-only...): one line too, naming
            # the run directory when the error names no file
            cause = _user_error_in_chain(exc) or write_error(exc, fallback_dir=_run_dir())
            deleted = _deleted_key(exc) if cause is None else None
            if cause is None and deleted is None:
                raise
            if deleted is not None:
                key, removed = deleted
                message = (
                    f"error: setting {key} is needed, but the override ~{removed} removed it: drop ~{removed} "
                    f"(to change the value, give {removed}=VALUE)"
                )
            elif isinstance(cause, MissingMandatoryValue):
                key = cause.full_key
                message = f"error: setting {key} has no value: pass {key}=VALUE on the command line"
            else:
                message = f"error: {_without_worker_traceback(str(cause))}"
        _log_to_files(message)  # the console gets the message once, from the print below
        print(message, file=sys.stderr)
        _remove_empty_run_dir()
        sys.exit(2)

    return wrapper


def _run_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def _guard_hydra_config_writes() -> None:
    """Hydra writes ``.hydra/*.yaml`` before the task runs, outside :func:`exit_on_user_error`: a
    full disk there would end in Hydra's traceback. Its writer is wrapped once so that it ends in
    the same one line (directory, space free) with exit code 2, and no directory is left."""
    import hydra.core.utils as hydra_utils

    original = hydra_utils._save_config
    if getattr(original, "fcn_guarded", False):
        return

    def save_config(cfg, filename: str, output_dir: Path) -> None:
        try:
            original(cfg, filename, output_dir)
        except OSError as exc:
            error = write_error(exc, path=Path(output_dir) / filename)
            if error is None:
                raise
            print(f"error: {error}", file=sys.stderr)
            _remove_empty_run_dir()
            sys.exit(2)

    save_config.fcn_guarded = True
    hydra_utils._save_config = save_config


_guard_hydra_config_writes()


def _remove_empty_run_dir() -> None:
    """A command that failed leaves nothing behind: the run directory Hydra made for it is removed
    when it holds only what Hydra wrote (``.hydra/``, the job's log). A directory with anything
    else, one a sweep's job runs in, or one whose ``.hydra/`` predates this command is kept."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log_name = f"{HydraConfig.get().job.name}.log"
    ours = (".hydra", log_name, ".run.lock") if _lock_is_ours(run_dir / ".run.lock") else (".hydra", log_name)
    if not run_dir.is_dir() or any(p.name not in ours for p in run_dir.iterdir()):
        return
    hydra_dir = run_dir / ".hydra"
    if hydra_dir.is_dir() and hydra_dir.stat().st_mtime < _STARTED - 1:
        return
    for handler in logging.getLogger().handlers:  # the log file is about to go
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in (run_dir.parent, run_dir.parent.parent):  # outputs/<job>/, outputs/ when now empty
        try:
            parent.rmdir()
        except OSError:  # not empty (other runs), or not ours to remove
            break


def _lock_is_ours(lock: Path) -> bool:
    # fcn.rundir's lock file: "host pid job" (read here without importing fcn.rundir, which needs torch)
    try:
        host, pid, *_ = lock.read_text().split()
    except (OSError, ValueError):
        return False
    return host == socket.gethostname() and pid == str(os.getpid())


def _log_to_files(message: str) -> None:
    # The run's log file keeps the error; the console handler would print it a second time.
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _user_error_in_chain(exc: BaseException) -> BaseException | None:
    # Hydra's instantiate wraps what a constructor raised; follow the chain to the user's mistake.
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (UserError, MissingMandatoryValue)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _deleted_key(exc: BaseException) -> tuple[str, str] | None:
    """(key read, key deleted) when ``exc`` (or its cause) is a read of a key that a ``~KEY``
    override of the command removed (``~optim``, ``~data.root``); None otherwise (a bug)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    removed = [o[1:].split("=", 1)[0] for o in HydraConfig.get().overrides.task if o.startswith("~")]
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        key = getattr(exc, "full_key", None) if isinstance(exc, (ConfigAttributeError, ConfigKeyError)) else None
        for gone in removed:
            if key and (key == gone or key.startswith(f"{gone}.") or gone.startswith(f"{key}.")):
                return key, gone
        exc = exc.__cause__ or exc.__context__
    return None


def _without_worker_traceback(message: str) -> str:
    # A DataLoader worker re-raises as "Caught UserError in DataLoader worker ... Original
    # Traceback ...", ending with the original "fcn.errors.UserError: <message>" line.
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split("UserError: ", 1)[-1]
