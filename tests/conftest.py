"""Shared fixtures: a tiny generated dataset and Hydra configs built with the compose API."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fcn.cli import CONFIG_DIR
from fcn.data.shapes import ensure_shapes
from fcn.process import start_process
from fcn.signals import GracefulStop

start_process()  # the test session is a process as the entry points are (OpenMP and malloc settings)

# Scan caches of the test session stay out of the user's ~/.cache (subprocesses inherit this).
os.environ["FCN_CACHE_DIR"] = tempfile.mkdtemp(prefix="fcn-test-cache-")

TINY_SHAPES = {"num_train": 12, "num_val": 5, "size": 48, "seed": 3}


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """An entry point run in-process (Hydra's job logging) leaves handlers on the root logger bound
    to that test's captured stderr; the next test's logs would hit the closed stream. Put them back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small generated shapes dataset, made once per test session."""
    return ensure_shapes(tmp_path_factory.mktemp("data") / "shapes", **TINY_SHAPES)


def compose_config(name: str, overrides: list[str]):
    """Build a config exactly as the entry point would, without running Hydra's app."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tiny_train_overrides(shapes_root: Path) -> list[str]:
    """A few-step training run on the tiny dataset."""
    gen = ",".join(f"{k}:{v}" for k, v in TINY_SHAPES.items())
    return [
        f"data.root={shapes_root}",
        f"data.generate={{{gen}}}",
        "data.crop_size=40",
        "trainer=debug",
        "trainer.batch_size=4",
        "logger.log_every_n_steps=1",
        "logger.num_images=2",
    ]


@pytest.fixture(scope="session")
def trained_run(shapes_root, tmp_path_factory) -> Path:
    """A run directory of a few training steps on the tiny dataset (checkpoints, metrics, events)."""
    from fcn.train import train

    out = tmp_path_factory.mktemp("train_run")
    train(compose_config("train", tiny_train_overrides(shapes_root)), out)
    return out


class StopAtStep(GracefulStop):
    """Behaves as if SIGTERM arrived during step ``k`` (in this process only)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def should_stop(self, step: int) -> bool:
        if step >= self.k:
            self.requested = signal.SIGTERM
        return self.requested is not None


# A child process's first lines that start ``scripts/train.py`` as a user does (``--cfg=job``, which
# answers without training and without importing torch), its printed config silenced; the code after
# them sees the process as every entry point leaves it before torch loads.
START_AS_THE_TRAIN_SCRIPT = """
import contextlib, io, runpy, sys
sys.argv = ["scripts/train.py", "--cfg=job"]
with contextlib.redirect_stdout(io.StringIO()):
    runpy.run_path("scripts/train.py", run_name="__main__")
"""
