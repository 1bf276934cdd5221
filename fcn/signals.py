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

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Signals a scheduler sends a job before its time runs out (submitit and SLURM's --signal use
# SIGUSR1 / SIGUSR2); their default action would kill a worker.
_NOTICE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
WORKER_SIGNALS = (*STOP_SIGNALS, *_NOTICE_SIGNALS)  # what a DataLoader worker must not die of


def protect_worker() -> None:
    """In a DataLoader worker: survive the stop signals sent to the process group.

    SIGINT, SIGHUP and the schedulers' notice signals are ignored: the main process decides. SIGTERM
    is taken by a thread of the worker (:func:`_take_sigterm`), which reads who sent it: the main
    process's (multiprocessing's ``terminate()``, at its exit or when a worker did not stop in time)
    ends the worker at once with exit code 0, which the main process never reports as a crash; the
    first from anyone else (the group's) is ignored, as the main process finishes its step, saves and
    shuts the workers down; a second ends the worker. A worker whose main process is gone ends by
    itself (torch's watchdog).

    A worker started by :func:`fcn.data.loader.make_loader` starts with these signals blocked
    (:func:`blocked`): one sent while it starts stays pending until this function has set them.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)  # already so for a worker of make_loader
    for signum in (signal.SIGINT, signal.SIGHUP, *_NOTICE_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)  # a pending one is discarded
    if hasattr(signal, "sigwaitinfo"):
        # Only the thread below takes SIGTERM (every other thread blocks it); torch's handler would
        # end the worker on the group's.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        threading.Thread(target=_take_sigterm, args=(os.getppid(),), name="fcn-sigterm", daemon=True).start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(WORKER_SIGNALS) - {signal.SIGTERM})
    else:  # macOS: no sender to read; the first SIGTERM is ignored, the next one ends the worker
        signal.signal(signal.SIGTERM, _second_sigterm_ends)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)


def _take_sigterm(main_pid: int) -> None:
    group_signals = 0
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == main_pid:
            os._exit(0)  # the main process stopping us: not a crash (torch's own handler does the same)
        group_signals += 1
        if group_signals > 1:  # a second one: end as SIGTERM ends a process
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


def _second_sigterm_ends(signum: int, frame) -> None:
    del frame
    signal.signal(signum, signal.SIG_DFL)


@contextlib.contextmanager
def blocked(signums=WORKER_SIGNALS):
    """Block ``signums`` in this thread while the body runs; they are delivered after it.

    Around the start of DataLoader workers: a forked worker inherits the blocked mask, so the
    group's signal sent while it starts waits for :func:`protect_worker` instead of killing it.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stopping(grace_s: float = 0.0) -> bool:
    """Whether this process has been asked to stop (a :class:`GracefulStop` handles a stop signal
    and has received one), waiting up to ``grace_s`` seconds for one on its way.

    The grace covers a signal sent to the whole process group: a worker's death by it can reach
    the main process a moment before the main process's own copy.
    """
    deadline = time.monotonic() + grace_s
    while True:
        for signum in STOP_SIGNALS:
            stop = getattr(signal.getsignal(signum), "__self__", None)  # the handler: a GracefulStop's method
            if isinstance(stop, GracefulStop) and stop.requested is not None:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)  # a signal arriving now runs its handler here


class GracefulStop:
    """Context manager that turns SIGTERM/SIGINT into a flag the training loop polls.

    ``requested`` is the number of the first signal received, or None. ``also`` adds signals
    that stop the same way (the submitit launcher's pre-timeout/preemption signal, SIGUSR2).
    ``exits``: the process exits with 128 + signal after a stop (an entry point), so once one was
    requested SIGTERM, SIGINT and SIGHUP stay ignored after the block (a second SIGTERM to the group while the
    process exits would end it by the signal, not with its exit code); otherwise they get their
    previous handlers back.
    """

    def __init__(self, also: tuple[int, ...] = (), *, exits: bool = False) -> None:
        self.requested: int | None = None
        self._exits = exits
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
        ignore = self._exits and self.requested is not None
        for signum, handler in self._previous.items():
            # ``also``'s signals get their handlers back: submitit's requeues the job after the save
            signal.signal(signum, signal.SIG_IGN if ignore and signum in STOP_SIGNALS else handler)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``last.pt``; the exit code is 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted by signal {signum}")  # the entry point adds the resume command
        self.signum, self.checkpoint = signum, checkpoint
