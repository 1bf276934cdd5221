"""Where a run's numbers and pictures go: :class:`TensorBoardLogger`, or :class:`NullLogger` for
none. Both have the small interface the training loop uses; ``configs/logger/*.yaml`` name the
class with ``_target_``, so another logger is one class here and one YAML there.

Loggers receive plain values (floats, tensors, HWC pictures); what to log is decided by the loop.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import torch

from fcn.errors import UserError, write_error


class NullLogger:
    """Logs nothing: ``logger=none``, and every rank but 0 of a ``torchrun`` job."""

    def __init__(self, log_every_n_steps: int | None = None, num_images: int | None = None) -> None:
        """Settings of other loggers are accepted and ignored: ``logger=none`` composes with
        overrides such as ``logger.log_every_n_steps=1`` written for them."""

    enabled = False  # False: the loop draws no pictures and computes no gradient norms for it
    log_every_n_steps = 0
    num_images = 0

    def open(self, out_dir: Path, purge_step: int | None = None) -> None:
        """Start logging into the run directory ``out_dir``; on resume, ``purge_step`` is the first
        step whose earlier records (written after the checkpoint) are dropped."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A piece of text (e.g. the model summary)."""

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        """One number at one step."""

    def log_image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        """A picture: CHW tensor or HWC uint8 array."""

    def log_layout(self, layout: dict) -> None:
        """Charts that belong together: ``{category: {chart title: ["Multiline", [tags]]}}``."""

    def log_hparams(self, hparams: dict, metrics: dict, run_name: str = "", step: int = 0) -> None:
        """The run's main settings beside its final scores (``hparams`` values: str, int, float, bool;
        ``metrics``: tag -> score, logged at ``step``, e.g. the best checkpoint's); ``run_name`` (e.g.
        the run's overrides) names the run in a table of several runs."""

    def close(self) -> None:
        """Flush and release files; safe to call twice."""


def _quiet_writer_thread(args) -> None:
    # TensorBoard writes events in a thread; a failed write (full disk, ulimit -f) would print that
    # thread's traceback, and the writer raises the same error again at its next call in the main
    # thread, where it becomes one line (:func:`_one_line_on_write_error`). Other threads: as before.
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _previous_excepthook(args)


_previous_excepthook = threading.excepthook


def _one_line_on_write_error(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as exc:
            error = write_error(exc, path=self._dir, note="the checkpoints written so far are intact")
            if error is None:
                raise
            raise error from exc

    return wrapper


class TensorBoardLogger(NullLogger):
    """Event files in ``<run dir>/tensorboard`` (``tensorboard --logdir <run dir>``).

    Args:
        log_every_n_steps: train loss, learning rate and gradient norm every N steps (>= 1).
        num_images: fixed validation images shown (input, truth, prediction) at each validation.
    """

    def __init__(self, log_every_n_steps: int = 10, num_images: int = 4) -> None:
        if log_every_n_steps < 1:
            raise UserError(f"logger.log_every_n_steps={log_every_n_steps}: must be at least 1")
        self.enabled = True
        self.log_every_n_steps = log_every_n_steps
        self.num_images = num_images
        self._writer = None
        self._dir: Path | None = None

    @_one_line_on_write_error
    def open(self, out_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only needed here

        if threading.excepthook is _previous_excepthook:
            threading.excepthook = _quiet_writer_thread
        self._dir = Path(out_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self._dir), purge_step=purge_step)

    @_one_line_on_write_error
    def log_text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, step)

    @_one_line_on_write_error
    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, value, step)

    @_one_line_on_write_error
    def log_image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        if isinstance(image, np.ndarray) and image.ndim == 3:
            self._writer.add_image(tag, image, step, dataformats="HWC")
        else:
            self._writer.add_image(tag, image, step)

    @_one_line_on_write_error
    def log_layout(self, layout: dict) -> None:
        self._writer.add_custom_scalars(layout)

    @_one_line_on_write_error
    def log_hparams(self, hparams: dict, metrics: dict, run_name: str = "", step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        # What SummaryWriter.add_hparams writes, in a sub-run named ``run_name`` (the HPARAMS tab
        # lists the run by that folder's path), less its "experiment" record: with one, TensorBoard
        # takes some one run's list of settings as everyone's, sorted by name, and shows the first
        # five. Without it, TensorBoard gathers the settings of all runs and puts those that differ
        # between them (a sweep's swept keys) first. Its columns of scores are the scalars of this
        # sub-run, sorted by tag; TensorBoard's Time Series shows them too, so their tags belong in a
        # group that sorts after the curves (fcn/run_logging.py).
        _, session_start, session_end = hparams_summaries(hparams, metrics)
        folder = self._dir / hparams_run_name(run_name)
        for earlier in folder.glob("events.out.tfevents.*"):  # a stopped run's row, replaced by its resumed run's
            earlier.unlink()
        with SummaryWriter(log_dir=str(folder)) as writer:
            writer.file_writer.add_summary(session_start)
            writer.file_writer.add_summary(session_end)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)

    @_one_line_on_write_error
    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def hparams_run_name(name: str) -> str:
    """``name`` as one folder name (the HPARAMS tab's run name): no path separators, at most 200
    characters; ``"defaults"`` when empty (a run without overrides)."""
    name = name.replace("/", "_").replace("\\", "_").strip().strip(".")
    return name[:200] or "defaults"
