"""The one-line error exit of every entry point: a user's mistake ends with one clear line and
exit code 2, anything else keeps its traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

from omegaconf.errors import MissingMandatoryValue

from fcn.errors import UserError, disk_full_error

log = logging.getLogger(__name__)


def exit_on_user_error(task: Callable) -> Callable:
    """Run ``task``; a :class:`UserError` or a missing mandatory setting ends it with one line.

    The message goes to stderr and the log file; the exit code is 2. Anything else is a bug and
    keeps its traceback.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised below unless it is the user's mistake
            cause = _user_error_in_chain(exc) or disk_full_error(exc)  # a full disk: one line too
            if cause is None:
                raise
            if isinstance(cause, MissingMandatoryValue):
                key = cause.full_key
                message = f"error: setting {key} has no value: pass {key}=VALUE on the command line"
            else:
                message = f"error: {_without_worker_traceback(str(cause))}"
        _log_to_files(message)  # the console gets the message once, from the print below
        print(message, file=sys.stderr)
        sys.exit(2)

    return wrapper


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


def _without_worker_traceback(message: str) -> str:
    # A DataLoader worker re-raises as "Caught UserError in DataLoader worker ... Original
    # Traceback ...", ending with the original "fcn.errors.UserError: <message>" line.
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split("UserError: ", 1)[-1]
