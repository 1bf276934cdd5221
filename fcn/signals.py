"""Graceful stop on SIGTERM / SIGINT: finish the current step, save, then exit.

A cluster scheduler sends SIGTERM before it kills a job; a user presses Ctrl-C. Either way the
step in flight completes, ``last.pt`` is written, and the process exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT). A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

log = logging.getLogger(__name__)


class GracefulStop:
    """Context manager that turns SIGTERM/SIGINT into a flag the training loop polls.

    ``requested`` is the number of the first signal received, or None. ``also`` adds signals
    that stop the same way (the submitit launcher's pre-timeout/preemption signal, SIGUSR2).
    """

    def __init__(self, also: tuple[int, ...] = ()) -> None:
        self.requested: int | None = None
        self._signals = (signal.SIGTERM, signal.SIGINT, *also)
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
