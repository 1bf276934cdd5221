"""Where a process starts: the settings that must be made before torch loads, and the console scripts.

Importing any ``fcn`` module changes nothing in the process; :func:`start_process` does, and it is
called first by every ``scripts/*.py`` and by the console scripts below (``fcn-evaluate`` ...,
see ``pyproject.toml``), before the entry point's module imports torch.
"""

from __future__ import annotations

import importlib

from fcn.malloc import keep_freed_memory
from fcn.threads import set_openmp_defaults


def start_process() -> None:
    """OpenMP threads that spin only briefly at a barrier, then sleep (:mod:`fcn.threads` says why),
    and large tensors that reuse freed heap memory instead of fresh, zero-filled pages every step
    (:mod:`fcn.malloc`). A value the user exported wins; calling it twice changes nothing more."""
    set_openmp_defaults()
    keep_freed_memory()


def _launch(module: str) -> None:
    start_process()
    importlib.import_module(module).main()


def train() -> None:
    """``fcn-train``."""
    _launch("fcn.cli.train")


def search() -> None:
    """``fcn-search``."""
    _launch("fcn.cli.search")


def evaluate() -> None:
    """``fcn-evaluate``."""
    _launch("fcn.cli.evaluate")


def predict() -> None:
    """``fcn-predict``."""
    _launch("fcn.cli.predict")


def export() -> None:
    """``fcn-export``."""
    _launch("fcn.cli.export")


def check_data() -> None:
    """``fcn-check-data``."""
    _launch("fcn.cli.check_data")


def model_table() -> None:
    """``fcn-model-table``."""
    _launch("fcn.cli.model_table")


def benchmark() -> None:
    """``fcn-benchmark``."""
    _launch("fcn.bench.run")
