"""Saving and loading checkpoints: atomic writes, safe loads, clear errors.

A checkpoint is a dict of tensors and plain Python values only (the config as a dict, class
names, palette, random states as tensors and lists), so it loads with
``torch.load(..., weights_only=True)``: nothing in it can run code when it is read.

Writes never damage what is already on disk. The bytes go to an unnamed temporary file in the
checkpoint's folder (``O_TMPFILE``; a named ``.tmp`` file where the file system lacks it), are
flushed to disk, and only then get the checkpoint's name with an atomic rename. A kill at any
moment leaves the previous file intact and, with ``O_TMPFILE``, no partial file at all.

Every checkpoint carries a digest of its own bytes (the CRC-32 of each 64 MiB chunk), computed
right after torch has written them and stored as the zip archive's comment (the last bytes of the
file, which torch's reader skips); chunks are hashed in parallel threads, on saving and loading.
:func:`load_checkpoint` checks it before unpickling: a flipped bit anywhere in the file, tensor
data included, is reported like a truncated file, and ``resume=auto`` falls back to
``last.prev.pt``. Files written before digests existed load without the check.

A file that is not a checkpoint at all (an image, an ONNX export, a text file, a directory...)
is named for what it is; only a file that really holds code is "refused for safety", and torch's
advice to load it unsafely is never passed on.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import pickle
import re
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fcn.errors import UserError, write_error

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Settings that fix the shape of the network: a checkpoint only loads into the same ones.
ARCHITECTURE_KEYS = ("backbone", "variant", "width", "num_classes", "scaled_skips")
# What a checkpoint written before a setting existed was trained with.
ARCHITECTURE_DEFAULTS = {"scaled_skips": False}
# The digest record, the zip comment after the end-of-central-directory record:
# "fcn-crc32:<chunk size>:" then 8 hex digits per chunk of the archive (comment length 0, as written).
_EOCD = b"PK\x05\x06"  # end-of-central-directory signature; the record is 22 bytes plus the comment
_DIGEST_TAG = b"fcn-crc32:"
_CHUNK = 64 << 20  # bytes per CRC; one chunk per thread when verifying
_MAX_COMMENT = 0xFFFF
_ONNX_NEXT_FIELDS = b"\x12\x1a\x22\x28\x32\x3a\x42"  # protobuf tags of ModelProto fields 2-8


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
    bad = _non_finite(state.get("model", {}))
    if bad is not None:
        raise UserError(f"refusing to write {path}: weight {bad} holds NaN or inf")
    check_writable(path)
    if keep_previous:
        check_writable(previous_path(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, path=path) or exc from exc
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
    except (OSError, RuntimeError) as exc:  # torch's zip writer turns a failed write into a RuntimeError
        full = write_error(
            exc,
            path=path,
            needed=_state_bytes(state),
            note="nothing was overwritten, the previous checkpoint (if any) is intact",
        )
        if full is not None:
            raise full from exc
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _remove_leftovers(path)


def check_writable(path: str | Path) -> None:
    """Raise :class:`UserError` when something that is not a file (a directory, a socket...) is where
    the checkpoint ``path`` is to be written: checked when a run starts, so no epoch is lost to it."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise UserError(
            f"cannot write checkpoint {path}: {kind} is in its place; move or remove it, then run again "
            "(add resume=auto to continue)"
        )


def _remove_leftovers(path: Path) -> None:
    # Complete temporaries a kill left between writing and renaming (one writer per checkpoint).
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def _write_durably(state: dict[str, Any], path: Path) -> Path:
    """Serialise to a temporary file next to ``path``, fsync it, and return its name."""
    name = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o644)
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
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _dump(state, fd)
    except BaseException:
        name.unlink(missing_ok=True)
        raise
    return name


def _dump(state: dict[str, Any], fd: int, close: bool = True) -> None:
    with os.fdopen(fd, "r+b", closefd=close) as f:
        torch.save(state, f)
        f.flush()
        _append_digest(f)
        f.flush()
        os.fsync(f.fileno())


def _append_digest(f) -> None:
    """Store the CRCs of the archive just written (its comment length still 0) as its comment."""
    size = f.seek(0, os.SEEK_END)
    with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
        if mapped[-22:-18] != _EOCD or mapped[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end the file with a zip directory record")  # a torch change
        comment = _DIGEST_TAG + b"%d:" % _CHUNK + b"".join(b"%08x" % crc for crc in _crcs(mapped, size, _CHUNK))
    f.seek(size - 2)
    f.write(struct.pack("<H", len(comment)) + comment)  # the comment's length, then the comment: the file's end


def _crcs(mapped: mmap.mmap, length: int, chunk: int) -> list[int]:
    """The CRC-32 of each ``chunk`` bytes of the first ``length`` (the archive as written: its last two
    bytes, the comment length, taken as 0), in parallel threads (zlib releases the GIL)."""
    view = memoryview(mapped)
    try:
        with ThreadPoolExecutor(max(1, min(-(-length // chunk), os.cpu_count() or 1, 8))) as pool:
            return list(pool.map(partial(_crc, view, length, chunk), range(0, length, chunk)))
    finally:
        view.release()


def _crc(view: memoryview, length: int, chunk: int, start: int) -> int:
    end = min(start + chunk, length)
    data_end = max(start, min(end, length - 2))  # the bytes before the comment length
    return zlib.crc32(bytes(end - data_end), zlib.crc32(view[start:data_end]))


def verify_digest(path: str | Path) -> bool | None:
    """Check the digest :func:`save_checkpoint` stored in ``path``.

    Returns True when it matches, None for a file without one (written before digests existed,
    or not written by fcn). Raises :class:`UserError` ("corrupt or truncated") when the bytes
    differ from those saved, or the digest record itself is damaged. Costs one pass over the
    file (CRC-32 at about 4 GB/s per core, chunks in parallel threads, memory-mapped: no copy).
    """
    path = Path(path)
    damaged = UserError(f"checkpoint {path} is corrupt or truncated (its digest record is damaged)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        tail = mapped[max(0, len(mapped) - 22 - _MAX_COMMENT) :]
        if tail[-22:-18] == _EOCD and tail[-2:] == b"\0\0":
            return None  # a plain archive: no digest
        at = tail.rfind(_DIGEST_TAG)
        if at < 0:
            eocd = tail.rfind(_EOCD)
            if eocd >= 0 and tail[eocd + 20 : eocd + 22] != b"\0\0" and _is_torch_zip(path):
                raise damaged  # a torch archive with a comment that is not (any more) ours
            return None  # not an archive fcn wrote (torch's own checks decide)
        comment = tail[at:]
        record = re.fullmatch(rb"fcn-crc32:(\d+):((?:[0-9a-f]{8})+)", comment)  # chunk size, 8 hex digits per chunk
        length = len(mapped) - len(comment)  # the archive as written, before its comment
        eocd = mapped[max(0, length - 22) : length]  # the end-of-central-directory record: comment length last
        if record is None or eocd[:4] != _EOCD or eocd[-2:] != struct.pack("<H", len(comment)):
            raise damaged
        chunk, expected = int(record[1]), [int(record[2][i : i + 8], 16) for i in range(0, len(record[2]), 8)]
        if chunk < 4096 or len(expected) != -(-length // chunk):
            raise damaged
        found = _crcs(mapped, length, chunk)
    if found != expected:
        bad = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
        raise UserError(
            f"checkpoint {path} is corrupt or truncated (its bytes differ from those saved: digest mismatch in "
            f"bytes {bad * chunk}-{min((bad + 1) * chunk, length)}, e.g. a flipped bit on disk or in a copy); "
            "use another copy (last.prev.pt, best.pt)"
        )
    return True


def _state_bytes(state: Any) -> int:
    """Roughly the bytes ``state`` takes on disk: its tensors' sizes."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _non_finite(model_state: Any) -> str | None:
    """The name of the first floating-point weight holding NaN or inf, or None."""
    if not isinstance(model_state, dict):
        return None
    for name, tensor in model_state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, key: str | None = None, verify: bool = True
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, refusing anything unsafe or broken.

    ``key`` is the setting the path came from (``checkpoint``, ``init_from``, ``resume``), named
    in the messages. ``verify`` checks the digest (:func:`verify_digest`) first.

    Raises :class:`UserError`, one line: the file is missing, is not a checkpoint (says what it is:
    a directory, an empty file, an image, an ONNX or safetensors file, text, another zip...), is
    corrupt or truncated (digest mismatch included), holds code (refused for safety), or is
    newer than this fcn.
    """
    path = Path(path)
    given = f" (given as {key}=)" if key else ""
    if path.is_dir():
        raise UserError(f"not a checkpoint: {path}{given} is a directory; {_fix(key)}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path.resolve()} (check the {key or 'checkpoint'}=PATH you gave)")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise UserError(f"checkpoint {path}{given} is corrupt or truncated (an empty file, 0 bytes)")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive (torch.save) or a pickle (older torch)
        if verify:
            verify_digest(path)  # a checkpoint whose first bytes are damaged is corrupt, not "something else"
        raise UserError(f"not a checkpoint: {path}{given} is {describe_file(path, head)}; {_fix(key)}")
    with ThreadPoolExecutor(1) as pool:
        # The digest is checked while torch reads the file (its threads release the GIL): the cost hides
        # behind the load. A mismatch (raised by check.result()) wins over whatever the load made of the bytes.
        check = pool.submit(verify_digest, path) if verify and head.startswith(b"PK") else None
        try:
            state = _torch_load(path, map_location, given, key, head)
        finally:
            if check is not None and check.result() is None:
                log.debug("%s has no digest (written by an older fcn, or not by fcn): no integrity check", path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}{given} is not an fcn checkpoint (no 'model' and 'config' entries); {_fix(key)}")
    bad = _non_finite(state["model"])
    if bad is not None:
        raise UserError(
            f"checkpoint {path}{given} is damaged: weight {bad} holds NaN or inf (fcn never writes such weights: "
            "the file was altered after it was saved); use another copy (last.prev.pt, best.pt)"
        )
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format {state['format_version']}, newer than this fcn reads "
            f"({FORMAT_VERSION}); upgrade fcn"
        )
    return state


def _torch_load(path: Path, map_location, given: str, key: str | None, head: bytes) -> Any:
    """``torch.load`` with ``weights_only``; every failure as a one-line :class:`UserError`."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _torch_reason(exc)
        if "unsupported global" in reason.lower() or "unsupported class" in reason.lower():
            raise UserError(
                f"checkpoint {path}{given} holds objects other than tensors and plain Python values and was "
                f"refused for safety (weights_only load): {reason}"
            ) from exc
        raise UserError(f"checkpoint {path}{given} is corrupt or truncated (UnpicklingError: {reason})") from exc
    except Exception as exc:  # noqa: BLE001 - broken bytes raise anything (IndexError, KeyError, struct.error...)
        if head.startswith(b"PK") and not _is_torch_zip(path):
            raise UserError(f"not a checkpoint: {path}{given} is {describe_file(path, head)}; {_fix(key)}") from exc
        raise UserError(
            f"checkpoint {path}{given} is corrupt or truncated ({exc.__class__.__name__}: {_torch_reason(exc)})"
        ) from exc
    return state


def _fix(key: str | None) -> str:
    return f"give {key or 'checkpoint'}= a .pt file written by fcn training (checkpoints/best.pt or last.pt)"


def _torch_reason(exc: BaseException) -> str:
    """torch's message in one line, without its advice to load with ``weights_only=False``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line and not line.startswith("Check the documentation")]
    return " ".join(kept)[:300] or exc.__class__.__name__


def _is_torch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return True  # a damaged archive: report it as corrupt, not as another kind of file


def describe_file(path: str | Path, head: bytes | None = None) -> str:
    """What a file that is not a checkpoint looks like, from its first bytes: "a JPEG image",
    "an ONNX model", "a text file (starts with ...)" (a phrase to follow "<path> is")."""
    path = Path(path)
    if head is None:
        with open(path, "rb") as f:
            head = f.read(4096)
    size = path.stat().st_size
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "a PNG image"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "a damaged zip archive"
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"a zip archive that torch.save did not write (it holds {listed or 'nothing'})"
    if len(head) > 9:
        header_len = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and 2 <= header_len <= size - 8:
            return "a safetensors file (fcn reads the .pt checkpoints its training writes)"
    # ONNX: a protobuf ModelProto, ir_version (field 1) first, then producer_name, producer_version...
    if path.suffix.lower() == ".onnx" or (head[0] == 0x08 and len(head) > 2 and head[2] in _ONNX_NEXT_FIELDS):
        return "an ONNX model (an export for inference; it cannot be loaded back)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = head[: exc.start].decode("utf-8") if exc.start > len(head) - 4 else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"a text file (starts with {first!r})"
    return f"not a file torch.save writes (it starts with bytes {head[:8].hex(' ')})"


def load_resumable(path: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable of ``path`` and its :func:`previous_path`, or None when neither exists.

    A corrupt ``path`` is reported and skipped in favour of the previous one.
    """
    path = Path(path)
    candidates = [p for p in (path, previous_path(path)) if p.is_file()]
    errors = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate, key="resume")
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
    path: str | Path, device: str | torch.device = "cpu", channels_last: bool = False, key: str = "checkpoint"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network a checkpoint was trained as, with its weights, in eval mode; returns
    ``(model, checkpoint)``. The one way every entry point (evaluate, predict, export) rebuilds a model.

    The settings come from the checkpoint's own model config (``FCN(**settings)``, no Hydra);
    weights come from the checkpoint, never from a download. NHWC memory order with
    ``channels_last``. ``key`` is the setting that named the file, for messages. Raises
    :class:`UserError` when the file is no intact checkpoint or the weights do not fit the settings.
    """
    from fcn.state_dict import load_into  # a leaf module; imported here to keep this import light

    ckpt = load_checkpoint(path, key=key)
    model = rebuild_model(ckpt["config"]["model"]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    load_into(model, ckpt["model"], f"checkpoint {path}", fix="its weights do not match its own model config")
    return model.eval(), ckpt
