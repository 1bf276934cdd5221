"""Files a user gets (predicted masks, overlays, probabilities, exports, reports) appear under their
final name only when complete.

Each is written to a hidden temporary name in its own folder (``.0001.4242.tmp.png`` for
``0001.png``, written by process 4242) and renamed into place with :func:`os.replace`, which is
atomic within one file system: a reader, or a run that stopped half way (an exception, a full
disk, Ctrl-C), sees the old file or the new one, never part of one. A failed write removes its
temporary; only a process killed outright (SIGKILL, power loss) can leave one behind, under its
hidden name. Checkpoints have their own, durable writer (:mod:`fcn.checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from fcn.errors import write_error


@contextlib.contextmanager
def atomic_path(path: str | Path, *, one_line: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same folder and extension, so writers that pick the
    format from the name, such as Pillow and ``np.save``, still do); when the block ends, the file
    written there is renamed to ``path``.

    Raises:
        UserError: the write or the rename failed for a reason of the operating system (full disk,
            ``ulimit -f``, read-only file system, permissions): one line naming ``path``. Nothing is
            left under ``path``'s name (an older file there stays as it was) and no temporary remains.
            With ``one_line=False`` the error goes out as raised (a caller with its own message, such
            as training's disk-full line with the resume command).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = (
            write_error(exc, path=path, note="nothing was written under that name")
            if one_line and isinstance(exc, Exception)
            else None
        )
        if error is not None:
            raise error from exc
        raise


def write_text(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, appearing under ``path`` only when complete (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
