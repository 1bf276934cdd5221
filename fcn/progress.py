"""What the training progress bar says beyond tqdm's own counts: ``epoch 3/12`` and the whole
run's estimated time left (:class:`RunClock`)."""

from __future__ import annotations

import time


def epoch_description(epoch: int, epochs: int) -> str:
    """The bar's label: ``"epoch 3/12"``."""
    return f"epoch {epoch}/{epochs}"


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``, ``65`` -> ``"1:05"`` (hours only when there are some)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def validations_left(epoch: int, epochs: int, val_every: int) -> int:
    """Validations from ``epoch`` (not yet validated) to the last: every ``val_every`` epochs and after the last."""
    return sum(1 for e in range(epoch, epochs + 1) if e % val_every == 0 or e == epochs)


class RunClock:
    """Estimates the time left in the whole run from what this process has timed so far.

    Time left = steps to do x mean seconds per training step so far + validations to do x mean
    seconds per validation so far. Before the first validation only training steps are counted
    (validation time unknown yet). Early stopping is not foreseen. ``now`` is a clock in seconds
    (``time.monotonic`` unless a test gives its own).
    """

    def __init__(self, total_steps: int, start_step: int, now=time.monotonic) -> None:
        self.total_steps, self.start_step, self.now = total_steps, start_step, now
        self.train_seconds = 0.0  # in finished epochs (or parts of epochs) of this process
        self.val_seconds, self.validations = 0.0, 0
        self._epoch_started: float | None = None

    def start_epoch(self) -> None:
        self._epoch_started = self.now()

    def end_epoch(self) -> None:
        if self._epoch_started is not None:
            self.train_seconds += self.now() - self._epoch_started
            self._epoch_started = None

    def add_validation(self, seconds: float) -> None:
        self.val_seconds += seconds
        self.validations += 1

    def eta(self, step: int, validations_to_do: int) -> float | None:
        """Seconds left after optimisation step ``step``; None before the first timed step."""
        done = step - self.start_step
        if done <= 0:
            return None
        running = self.now() - self._epoch_started if self._epoch_started is not None else 0.0
        per_step = (self.train_seconds + running) / done
        per_validation = self.val_seconds / self.validations if self.validations else 0.0
        return (self.total_steps - step) * per_step + validations_to_do * per_validation
