"""Saving and loading checkpoints: atomic writes, safe loads, clear errors.

A checkpoint is a dict of tensors and plain Python values only (the config as a dict, class
names, palette, random states as tensors and lists), so it loads with
``torch.load(..., weights_only=True)``: nothing in it can run code when it is read.

Writes never damage what is already on disk. The bytes go to an unnamed temporary file in the
checkpoint's folder (``O_TMPFILE``; a named ``.tmp`` file where the file system lacks it), are
flushed to disk, and only then get the checkpoint's name with an atomic rename. A kill at any
moment leaves the previous file intact and, with ``O_TMPFILE``, no partial file at all.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fcn.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Settings that fix the shape of the network: a checkpoint only loads into the same ones.
ARCHITECTURE_KEYS = ("backbone", "variant", "width", "num_classes", "scaled_skips")
# What a checkpoint written before a setting existed was trained with.
ARCHITECTURE_DEFAULTS = {"scaled_skips": False}


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the file it replaced (``last.pt`` -> ``last.prev.pt``)."""
    path = Path(path)
    return path.with_suffix(".prev" + path.suffix)


def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically; with ``keep_previous`` the old file stays as
    :func:`previous_path`. Refuses to write non-finite weights; a full disk is a :class:`UserError`
    that leaves every existing checkpoint as it was.
    """
    path = Path(path)
    _check_finite(state.get("model", {}), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp: Path | None = None
    try:
        tmp = _write_durably({"format_version": FORMAT_VERSION, **state}, path)
        if keep_previous and path.exists():
            # A hard link, not a rename: `path` exists at every moment, old or new.
            link = path.parent / f".{path.name}.prev-{os.getpid()}.tmp"
            os.link(path, link)
            os.replace(link, previous_path(path))
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing {path}: nothing was overwritten, the previous checkpoint "
                f"(if any) is intact; free space on {path.parent} and resume with resume=auto"
            ) from exc
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _remove_leftovers(path)


def _remove_leftovers(path: Path) -> None:
    # Complete temporaries a kill left between writing and renaming (one writer per checkpoint).
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def _write_durably(state: dict[str, Any], path: Path) -> Path:
    """Serialise to a temporary file next to ``path``, fsync it, and return its name."""
    name = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except (AttributeError, OSError):  # no O_TMPFILE (not Linux, or a file system without it)
        fd = None
    if fd is not None:
        try:
            _dump(state, fd, close=False)
            # Give the finished file a name. A directory fd makes os.link call linkat() with
            # AT_SYMLINK_FOLLOW, which links the open file rather than the /proc symlink.
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.link(f"/proc/self/fd/{fd}", name.name, dst_dir_fd=dir_fd, follow_symlinks=True)
                return name
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # no /proc, or no hard links here: fall through to a named temporary file
            finally:
                os.close(dir_fd)
        finally:
            os.close(fd)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _dump(state, fd)
    except BaseException:
        name.unlink(missing_ok=True)
        raise
    return name


def _dump(state: dict[str, Any], fd: int, close: bool = True) -> None:
    with os.fdopen(fd, "wb", closefd=close) as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_finite(model_state: dict[str, Any], path: Path) -> None:
    for name, tensor in model_state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"refusing to write {path}: weight {name} holds NaN or inf")


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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not an fcn checkpoint (no 'model' and 'config' entries)")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format {state['format_version']}, newer than this fcn reads "
            f"({FORMAT_VERSION}); upgrade fcn"
        )
    return state


def load_resumable(path: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable of ``path`` and its :func:`previous_path`, or None when neither exists.

    A corrupt ``path`` is reported and skipped in favour of the previous one.
    """
    path = Path(path)
    candidates = [p for p in (path, previous_path(path)) if p.is_file()]
    errors = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate)
        except UserError as exc:
            log.warning("%s; trying the previous checkpoint", exc)
            errors.append(str(exc))
            continue
        if candidate != path:
            log.warning("resuming from the previous checkpoint %s", candidate)
        return state, candidate
    if errors:
        raise UserError(f"no readable checkpoint to resume: {'; '.join(errors)}")
    return None


def check_architecture(
    saved_model_config: dict[str, Any], model_config: dict[str, Any], source: Path, allow: tuple[str, ...] = ()
) -> None:
    """Explain, before ``load_state_dict``, every architecture setting that differs.

    ``allow`` names settings that may differ: ``init_from`` allows ``num_classes`` and ``variant``
    (it re-initialises the layers they change) and ``scaled_skips`` (a constant factor, no
    weights); resuming allows nothing.
    """
    diffs = [
        f"model.{key}: checkpoint {saved_model_config.get(key)!r}, config {model_config.get(key)!r}"
        for key in ARCHITECTURE_KEYS
        if key not in allow
        and saved_model_config.get(key, ARCHITECTURE_DEFAULTS.get(key))
        != model_config.get(key, ARCHITECTURE_DEFAULTS.get(key))
    ]
    if diffs:
        raise UserError(
            f"checkpoint {source} was trained with another model ({'; '.join(diffs)}); "
            "set these to the checkpoint's values, or use init_from=PATH to start from its weights"
        )


# Settings a checkpoint's model config may hold that say how it was trained, not what it is
# (``sync_bn`` lived there before it moved to the trainer config): never passed to the constructor.
TRAINING_ONLY_MODEL_KEYS = ("sync_bn",)


def offline_model_settings(model_config: dict) -> dict:
    """``FCN`` keyword arguments from a model config, with no download and no weights file:
    for rebuilding a network whose weights come from elsewhere (a checkpoint, an export)."""
    settings = {k: v for k, v in model_config.items() if not k.startswith("_") and k not in TRAINING_ONLY_MODEL_KEYS}
    return settings | {"pretrained": False, "backbone_weights": None}


def rebuild_model(model_config: dict) -> torch.nn.Module:
    """The network a saved model config describes (``FCN(**settings)``, no Hydra), with fresh
    weights and nothing downloaded; its weights are loaded by the caller."""
    from fcn.models import FCN  # here: the models pull in torchvision, which loading a checkpoint does not need

    return FCN(**offline_model_settings(model_config))


def load_model(
    path: str | Path, device: str | torch.device = "cpu", channels_last: bool = False
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network a checkpoint was trained as, with its weights, in eval mode; returns
    ``(model, checkpoint)``. The one way every entry point (evaluate, predict, export) rebuilds a model.

    The settings come from the checkpoint's own model config (``FCN(**settings)``, no Hydra);
    weights come from the checkpoint, never from a download. NHWC memory order with
    ``channels_last``. Raises :class:`UserError` when the weights do not fit the settings.
    """
    ckpt = load_checkpoint(path)
    model = rebuild_model(ckpt["config"]["model"]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit its own model config: {str(exc).splitlines()[0]}") from exc
    return model.eval(), ckpt
