"""What the entry points share: turning the ``data`` config into datasets, the device, and
the one-line error exit."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from fcn.data.folder import SegmentationFolder, find_pairs
from fcn.data.shapes import ensure_shapes
from fcn.errors import UserError

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def exit_on_user_error(task: Callable) -> Callable:
    """Run ``task``; a :class:`UserError` or a missing mandatory setting ends it with one line.

    The message goes to stderr and the log file; the exit code is 2. Anything else is a bug and
    keeps its traceback.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except UserError as exc:
            message = f"error: {exc}"
        except MissingMandatoryValue as exc:
            message = f"error: setting {exc.full_key} has no value: pass {exc.full_key}=VALUE on the command line"
        log.error(message)
        print(message, file=sys.stderr)
        sys.exit(2)

    return wrapper


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; other names are passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu or auto")
    return torch.device(name)


def prepare_data_root(data: DictConfig) -> None:
    """Generate the built-in dataset on first use (data configs with a ``generate`` section)."""
    if data.get("generate"):
        ensure_shapes(data.root, **data.generate)


def build_dataset(data: DictConfig, split: str, transform: Callable | None) -> SegmentationFolder:
    """The dataset of one split, laid out as ``data`` says."""
    pairs = find_pairs(
        data.root,
        split,
        image_dir=data.image_dir,
        mask_dir=data.mask_dir,
        split_file=data.split_file,
        mask_suffix=data.mask_suffix,
    )
    return SegmentationFolder(pairs, transform)
