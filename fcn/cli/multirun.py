"""What one job of a multirun (``-m``: a sweep, jobs on SLURM) needs beyond a
plain run: the sweep's ``summary.csv``, failures reported to the sweeper instead of ending it, and
the hand-over to submitit's requeue on preemption (the swept keys for TensorBoard's HPARAMS tab
are the run's: :func:`fcn.run_logging.override_hparams`).

:class:`SweepSummary` is a Hydra callback (``hydra.callbacks`` in ``configs/train.yaml``): each
job writes its row next to its results (``sweep_row.json``, by rank 0 only, in the job's own
process, which may be on another machine), and the end of the multirun gathers the rows into
``<sweep dir>/summary.csv`` and prints them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ROW_FILE = "sweep_row.json"
COLUMNS = ("job", "overrides", "status", "best_val_miou", "pixel_acc", "time_s", "run_dir", "error")


class JobFailed(RuntimeError):
    """A job of a multirun that stopped on the user's kind of error (a diverged loss, out of
    memory, bad values): raised instead of exiting, so that Hydra records the job as failed and
    a sweeper that records failed jobs (a plugin's, such as Nevergrad's) goes on with the next.
    The search on Optuna (``scripts/search.py``) runs its trials in one process: see :mod:`fcn.search`."""


def failures_go_on() -> bool:
    """True inside a job of a multirun whose sweeper records a failed job and goes on (a sweeper
    plugin other than Hydra's basic one). Hydra's basic sweeper ends the sweep at a failed job anyway, so
    there a user's mistake keeps its one-line message and exit code 2."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return "BasicSweeper" not in str(HydraConfig.get().sweeper.get("_target_", "BasicSweeper"))


def requeue_signals() -> tuple[int, ...]:
    """Inside a job started by submitit: the signal it has SLURM send before the time limit or
    on preemption (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise); else ``()``.
    Training stops on it as on SIGTERM: it finishes the step and saves ``last.pt``."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return ()
    from submitit import JobEnvironment

    return (JobEnvironment._usr_sig(),)


def hand_over_to_submitit(signum: int) -> None:
    """After training stopped on submitit's signal and saved ``last.pt``: run submitit's own
    handler for it, which (on task 0) asks the launcher for the job to resubmit
    (:meth:`hydra_plugins.fcn_launchers.Requeueing.checkpoint`, the same job with ``resume=auto``),
    requeues it and exits. Nothing happens for any other signal or outside submitit."""
    if signum not in requeue_signals():
        return
    handler = signal.getsignal(signum)
    if callable(handler):
        log.warning("handing signal %d to submitit: requeue, then resume=auto in the same run directory", signum)
        handler(signum, None)


class SweepSummary(Callback):
    """Writes ``summary.csv`` (one row per job: overrides, best val mIoU, pixel accuracy, time,
    run directory) in the sweep directory at the end of every multirun, and prints it."""

    def __init__(self) -> None:
        self._started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A sweeper's files (a plugin's database) may live in the sweep directory: it exists from the start.
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or os.environ.get("RANK", "0") != "0":
            return  # a plain run has no sweep; ranks other than 0 write nothing
        run_dir = Path(str(config.hydra.runtime.output_dir))
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        failed = job_return.status != JobStatus.COMPLETED
        row = {
            "job": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "status": "failed" if failed else "completed",
            "best_val_miou": None if failed else metrics.get("miou"),
            "pixel_acc": None if failed else metrics.get("pixel_acc"),
            "time_s": round(time.time() - self._started, 1),
            "run_dir": str(run_dir),
            "error": str(job_return._return_value) if failed else "",
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ROW_FILE).write_text(json.dumps(row))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        common = set(OmegaConf.to_container(config.hydra.overrides.task))
        path, table = write_summary(sweep_dir, common)
        if path is None:
            return
        print(f"\nsweep summary ({path}):\n{table}")


def write_summary(sweep_dir: Path, common: set[str] = frozenset()) -> tuple[Path | None, str]:
    """Gather the jobs' rows under ``sweep_dir`` into ``sweep_dir/summary.csv``, one row per job
    in job order; ``overrides`` lists each job's own overrides (those not in ``common``, the
    command line's). Returns the file (None when no job wrote a row) and a printable table."""
    rows = [json.loads(p.read_text()) for p in sweep_dir.rglob(ROW_FILE)]
    if not rows:
        return None, ""
    rows.sort(key=lambda r: r["job"])
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in common)
    path = sweep_dir / "summary.csv"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(text.getvalue())
    return path, _table(rows)


def _table(rows: list[dict]) -> str:
    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    shown = ("job", "overrides", "status", "best_val_miou", "pixel_acc", "time_s", "run_dir")
    cells = [list(shown)] + [[cell(r[c]) if c != "time_s" else f"{r[c]:.1f}" for c in shown] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)
