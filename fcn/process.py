"""Where a process starts: the settings that must be made before torch loads, and the console scripts.

Importing any ``fcn`` module changes nothing in the process; :func:`start_process` does, and it is
called first by :func:`launch`, which every ``scripts/*.py`` and the console scripts below
(``fcn-evaluate`` ..., see ``pyproject.toml``) call, before the entry point's module imports torch.
"""

from __future__ import annotations

import importlib
import sys

from fcn.malloc import keep_freed_memory
from fcn.threads import set_openmp_defaults


def start_process() -> None:
    """OpenMP threads that spin only briefly at a barrier, then sleep (:mod:`fcn.threads` says why),
    and large tensors that reuse freed heap memory instead of fresh, zero-filled pages every step
    (:mod:`fcn.malloc`). A value the user exported wins; calling it twice changes nothing more."""
    set_openmp_defaults()
    keep_freed_memory()


# Each entry point's Hydra config and the module whose ``main`` runs it.
ENTRY_POINTS = {
    "train": "fcn.cli.train",
    "evaluate": "fcn.cli.evaluate",
    "predict": "fcn.cli.predict",
    "export": "fcn.cli.export",
    "check_data": "fcn.cli.check_data",
    "fix_data": "fcn.cli.fix_data",
    "model_table": "fcn.cli.model_table",
    "benchmark": "fcn.bench.run",
    "search": "fcn.cli.search",
    "upsampling_ablation": "fcn.bench.upsampling_ablation",
}


def launch(name: str) -> None:
    """Start the process and run entry point ``name`` (a key of :data:`ENTRY_POINTS`) on ``sys.argv``.
    ``--help``, ``--cfg job`` and Hydra's other information flags are answered from the config
    alone (:mod:`fcn.cli.info`), before the entry point's module imports torch."""
    start_process()
    from fcn.cli import hydra_run_dir  # ${fcn.claim_dir:...}, the run directory of every config built on train
    from fcn.cli.info import answer, asks_for_info

    if name != "train" and asks_for_info(sys.argv[1:]):  # fcn.cli.train loads torch only once a run starts
        with hydra_run_dir.print_only():  # names the run directory without making it
            answer(name)
    else:
        importlib.import_module(ENTRY_POINTS[name]).main()


def search() -> None:
    """``fcn-search``."""
    launch("search")


def evaluate() -> None:
    """``fcn-evaluate``."""
    launch("evaluate")


def predict() -> None:
    """``fcn-predict``."""
    launch("predict")


def export() -> None:
    """``fcn-export``."""
    launch("export")


def check_data() -> None:
    """``fcn-check-data``."""
    launch("check_data")


def fix_data() -> None:
    """``fcn-fix-data``."""
    launch("fix_data")


def model_table() -> None:
    """``fcn-model-table``."""
    launch("model_table")


def benchmark() -> None:
    """``fcn-benchmark``."""
    launch("benchmark")


def upsampling_ablation() -> None:
    """``fcn-upsampling-ablation``."""
    launch("upsampling_ablation")
