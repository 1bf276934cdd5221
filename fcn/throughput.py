"""Noticing, while training runs, that it has become much slower than it was, and saying why.

The start-up check (:func:`fcn.threads.spin_wait_warning`) looks at the load average before the
first step. A machine also fills up later: another job starts, a second training shares the
cores, the OpenMP threads begin to spin against each other (issue 17 measured 4-7x slowdowns on a
shared 2-core CPU). :class:`ThroughputWatch` times the training in windows of a few seconds and
compares each window's images per second with the best window of this run; when a window falls
under ``ratio`` of the best it returns one warning with what it measured and the fix, and stays
quiet until the rate has recovered (so a long slow spell is reported once, and a second one again).

On the CPU the warning says how much CPU time the process got (CPU seconds per wall second,
``time.process_time``, against its threads) next to the load average and how much of it can come
from other processes: with other work on the machine and threads that spin long, the spinning
(fix: a short spin count); with other work and a share well under one, the other work (fix: fewer
threads, or less other work); a small share on a quiet machine means the process waited, usually
for data; a full share while slower, something outside (swapping, throttling).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from fcn.threads import SPIN_COUNT, spins_long, usable_cpus


class ThroughputWatch:
    """Compare training throughput window by window with the best window of this run.

    Args:
        threads: torch's CPU threads (the CPU time the process could use per wall second).
        device_type: ``"cpu"`` or ``"cuda"``; the CPU diagnosis is given on the CPU only.
        window_s: seconds of training per window (a window also needs ``min_steps`` steps).
        ratio: warn when a window's images per second fall under this share of the best one.
        recover: the share of the best at which a reported slow spell counts as over.
        environ, clock, cpu_clock, loadavg, cpus: where the facts come from (tests give their own).

    The first window is warm-up (oneDNN primitives, compilation, page faults) and is never the best.
    Wrap anything that is not training (validation, a checkpoint save) in :meth:`pause` and
    :meth:`resume`: its time is left out and the window goes on, so frequent checkpoints or short
    epochs still fill windows.
    """

    def __init__(
        self,
        threads: int,
        device_type: str = "cpu",
        *,
        window_s: float = 10.0,
        min_steps: int = 5,
        ratio: float = 0.5,
        recover: float = 0.8,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
        cpus: Callable[[], int] | None = None,
    ) -> None:
        self.threads, self.device_type = max(1, threads), device_type
        self.window_s, self.min_steps, self.ratio, self.recover = window_s, min_steps, ratio, recover
        self.environ = os.environ if environ is None else environ
        self.clock, self.cpu_clock, self.loadavg = clock, cpu_clock, loadavg
        self.cpus = cpus or usable_cpus
        self.best: float | None = None  # images per second of the best finished window
        self.windows = 0  # windows finished since the start (the first is warm-up)
        self.slow = False  # inside a slow spell that has been reported
        self._paused: tuple[float, float] | None = None  # wall and CPU clocks when paused
        self._started, self._cpu_started, self._images, self._steps = self.clock(), self.cpu_clock(), 0, 0

    def pause(self) -> None:
        """Stop the window's clocks: what follows is not training."""
        if self._paused is None:
            self._paused = (self.clock(), self.cpu_clock())

    def resume(self) -> None:
        """Start the clocks again; the paused time counts nowhere."""
        if self._paused is not None:
            wall, cpu = self._paused
            self._started += self.clock() - wall
            self._cpu_started += self.cpu_clock() - cpu
            self._paused = None

    def step(self, images: int) -> str | None:
        """Count one training step of ``images`` images; returns a warning when the window it
        closes is slower than ``ratio`` of the best one and the slow spell is new, else None.
        (Called while paused, the window is measured up to the pause.)"""
        self._images += images
        self._steps += 1
        now = self._paused[0] if self._paused is not None else self.clock()
        wall = now - self._started
        if wall < self.window_s or wall <= 0 or self._steps < self.min_steps:
            return None  # the window goes on (the CPU clock is read only when one closes)
        cpu_now = self._paused[1] if self._paused is not None else self.cpu_clock()
        rate = self._images / wall
        cpu_share = (cpu_now - self._cpu_started) / wall / self.threads
        self.windows += 1
        # the next window starts where this one ended (at the pause, when paused)
        self._started, self._cpu_started, self._images, self._steps = now, cpu_now, 0, 0
        if self.windows == 1:
            return None  # warm-up
        best = self.best
        self.best = rate if best is None else max(best, rate)
        if best is None or rate >= self.recover * best:
            self.slow = False
            return None
        if rate >= self.ratio * best or self.slow:
            return None
        self.slow = True
        return self._message(rate, best, cpu_share)

    def _message(self, rate: float, best: float, cpu_share: float) -> str:
        head = f"training slowed to {rate:.1f} img/s, {rate / best:.2f} of this run's best window ({best:.1f} img/s)"
        if self.device_type != "cpu":
            shared = "nvidia-smi lists the processes on it" if self.device_type == "cuda" else "check what else runs"
            return (
                f"{head}: the {self.device_type} device may be waiting for data (raise trainer.num_workers) or be "
                f"shared with another job ({shared})"
            )
        try:
            load = self.loadavg()[0]
        except OSError:
            load = float("nan")
        cpus = self.cpus()
        # The load beyond this process's running threads: an upper bound on other processes' share
        # (this process's own threads waiting for a CPU count in the load average too).
        others = max(0.0, load - self.threads * cpu_share)
        busy = others >= 0.5 * cpus
        facts = (
            f"this process got {cpu_share:.2f} of its {self.threads} threads' CPU time; "
            f"load average {load:.1f} on {cpus} CPUs, up to {others:.1f} of it from other processes "
            "(data-loading workers included)"
        )
        fewer = ", or train with fewer threads (trainer.threads=1) until it ends" if self.threads > 1 else ""
        if busy and self.threads > 1 and spins_long(self.environ):
            fix = (
                f"OpenMP threads spin-wait against that other work: export GOMP_SPINCOUNT={SPIN_COUNT} "
                "(or OMP_WAIT_POLICY=PASSIVE) before starting, or set trainer.threads=1"
            )
        elif cpu_share < 0.7 and busy:
            fix = f"other work is taking the CPU: stop it{fewer}"
        elif cpu_share < 0.7:
            fix = "the process waited, usually for data: check the disk, or raise trainer.num_workers"
        else:
            fix = "the CPU is busy with this process but gets less done: is the machine swapping or throttled?"
        return f"{head}; {facts}: {fix}"
