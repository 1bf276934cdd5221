"""Hydra's information flags (``--help``, ``--cfg job``, ``--info`` ...) answered from the config alone.

Hydra prints what these ask for and exits before it calls the task function, so the entry point's
own module, which imports torch, is not needed: :func:`fcn.process.launch` sends such a command
line here, and ``python scripts/evaluate.py --help`` answers in a second, before torch loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from fcn.cli import CONFIG_DIR
from fcn.cli.suggest import suggest_keys

# Hydra flags that print and exit without running the task.
INFO_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion")


def asks_for_info(argv: Sequence[str]) -> bool:
    """Whether the command line ``argv`` (without the program name) holds one of :data:`INFO_FLAGS`."""
    return any(arg.split("=", 1)[0] in INFO_FLAGS for arg in argv)


def answer(config_name: str) -> None:
    """Let Hydra answer the information flags of the entry point whose primary config is ``config_name``
    (a mistyped key gets the same "did you mean ...?" line as a run)."""

    @suggest_keys(config_name)
    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def task(cfg: DictConfig) -> None:
        raise AssertionError("Hydra answers its information flags without running the task")

    task()
