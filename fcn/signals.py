"""Graceful stop on SIGTERM / SIGINT / SIGHUP: finish the current step, save, then exit.

A cluster scheduler or ``docker stop`` sends SIGTERM before it kills a job; a user presses
Ctrl-C; a closed terminal or ssh session sends SIGHUP. Either way the step in flight completes,
``last.pt`` is written, and the process exits with 128 + the signal number (143 for SIGTERM, 130
for SIGINT, 129 for SIGHUP). A second Ctrl-C aborts at once.

Such signals usually reach the whole process group, DataLoader workers included;
:func:`protect_worker` makes each worker leave them to the main process, which stops the
workers itself once it has saved.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

log = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Signals a scheduler sends a job before its time runs out (submitit and SLURM's --signal use
# SIGUSR1 / SIGUSR2); their default action would kill a worker.
_NOTICE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def protect_worker() -> None:
    """In a DataLoader worker: survive the stop signals sent to the process group.

    SIGINT, SIGHUP and the schedulers' notice signals are ignored: the main process decides. The
    first SIGTERM is ignored too (it is the group's): the main process finishes its step, saves
    and shuts the workers down. A second SIGTERM (multiprocessing's ``terminate()`` of a worker
    that did not stop in time) ends the worker, and so does the end of a grace period of
    :data:`WORKER_GRACE_S` seconds, so a worker never outlives a stop.
    """
    for signum in (signal.SIGINT, signal.SIGHUP, *_NOTICE_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


WORKER_GRACE_S = 60  # longer than a step and a save take; schedulers kill after 10-30 s anyway


def _worker_sigterm(signum: int, frame) -> None:
    del frame
    signal.signal(signum, signal.SIG_DFL)  # the next SIGTERM (the main process stopping us) ends the worker
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(WORKER_GRACE_S)


class GracefulStop:
    """Context manager that turns SIGTERM/SIGINT into a flag the training loop polls.

    ``requested`` is the number of the first signal received, or None. ``also`` adds signals
    that stop the same way (the submitit launcher's pre-timeout/preemption signal, SIGUSR2).
    """

    def __init__(self, also: tuple[int, ...] = ()) -> None:
        self.requested: int | None = None
        self._signals = (*STOP_SIGNALS, *also)
        self._previous: dict[int, object] = {}

    def should_stop(self, step: int) -> bool:
        """Polled after every step; ``step`` lets subclasses stop at a chosen step (tests)."""
        del step
        return self.requested is not None

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.requested = signum
        log.warning(
            "received %s: finishing this step, saving last.pt, then exiting (Ctrl-C again aborts at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> GracefulStop:
        for signum in self._signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``last.pt``; the exit code is 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted by signal {signum}")  # the entry point adds the resume command
        self.signum, self.checkpoint = signum, checkpoint
