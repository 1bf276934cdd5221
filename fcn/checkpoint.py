"""Saving and loading checkpoints: atomic writes, safe loads, clear errors.

A checkpoint is a dict of tensors and plain Python values only (the config as a dict, class
names, palette), so it loads with ``torch.load(..., weights_only=True)``: nothing in it can run
code when it is read.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from fcn.errors import UserError

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    then renamed over ``path``: a crash or kill mid-save leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, refusing anything unsafe or broken."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path.resolve()} (check the checkpoint=PATH you gave)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"checkpoint {path} holds objects other than tensors and plain Python values and was "
            f"refused for safety (weights_only load): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not an fcn checkpoint (no 'model' and 'config' entries)")
    return state
